"""Flux / SD3 qkv and fc1 input: INT8 rows of addcmul(shift, layer_norm(x), mult) without the float passes,
against torch_ref.norm_quantize_rows (fp32 throughout; a code may move by one at a rounding tie where the
kernel's rsqrt / sums differ from torch's in the last bit)."""
import pytest
import torch

from comfyui_octet.kernels import torch_ref
from kernel_testing import positive, randn, requires_triton

pytestmark = requires_triton


@pytest.mark.parametrize("shape", [(2, 5, 48), (1, 9, 300), (3, 1, 1024)])
@pytest.mark.parametrize("modulated", ["addcmul", "none", "shared"])
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("config", [None, (4, 4)])
def test_norm_quantizer_matches_reference(shape, modulated, static, config, rng, device):
    """Also with several rows per program (the float kernel's layout, a sweep candidate): rows past M masked."""
    from comfyui_octet.kernels.backends import triton_quant
    b, l, k = shape
    dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    x = randn(shape, rng, dtype, device, scale=3.0) + 0.5
    if modulated == "addcmul":      # Flux's mod vectors: slices of one [B, 1, 6K] output (strided batch rows)
        mod = randn((b, 1, 3 * k), rng, dtype, device)
        mult, shift = 1 + mod[..., :k], mod[..., 2 * k:]
    elif modulated == "shared":
        mult, shift = 1 + randn((k,), rng, dtype, device), randn((k,), rng, dtype, device)
    else:
        mult = shift = None
    smooth = positive(k, rng, device)
    static_scale = torch.tensor([0.02], device=device) if static else None
    quantizer = triton_quant.NormRowQuantizer(k, smooth, config)
    for _ in range(2):                       # the second call goes through the recorded direct launch on a GPU
        q, s = quantizer(x, 1e-6, mult, shift, static_scale)
    q_ref, s_ref = torch_ref.norm_quantize_rows(x, 1e-6, mult, shift, smooth, static_scale)
    assert q.shape == (b * l, k) and s.numel() == (1 if static else b * l)
    torch.testing.assert_close(s.cpu().reshape(-1), s_ref.reshape(-1).cpu(), rtol=2e-6, atol=0)
    diff = (q.cpu().int() - q_ref.cpu().int()).abs()
    assert diff.max() <= 1 and diff.float().mean() < 0.01
    assert q.abs().float().mean() > 1


def test_norm_quantizer_refuses_what_it_cannot_broadcast(rng, device):
    from comfyui_octet.kernels.backends import triton_quant
    x = randn((2, 3, 16), rng, device=device)
    per_token = randn((2, 3, 16), rng, device=device)
    assert not triton_quant.NormRowQuantizer.takes(x, per_token, None)
    assert triton_quant.NormRowQuantizer.takes(x, randn((2, 1, 16), rng, device=device), None)
    with pytest.raises(ValueError, match="normalises rows of K=16"):
        triton_quant.NormRowQuantizer(16)(x, 1e-6, per_token, None)


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("shape", [(2, 6, 3072), (1, 7, 1536)])
def test_codes_by_the_scales_reciprocal_stay_within_a_code_of_the_division(shape, static, rng, device):
    """``reciprocal_codes`` (the default) at Flux's and Wan's widths (rows padded to the tile: 3072 of 4096): the
    scales are the division's; a code moves by at most one, only where y / scale is near a half, and never past 127;
    static scales keep the division (and its clamp). On the CPU few codes move (2 of 1.5M at 8 x 64 x 3072), so the
    test also checks that the launch asked for the reciprocal."""
    from comfyui_octet.kernels.backends import triton_quant
    b, l, k = shape
    dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    x = randn(shape, rng, dtype, device, scale=3.0) + 0.5
    mod = randn((b, 1, 3 * k), rng, dtype, device)
    mult, shift = 1 + mod[..., :k], mod[..., 2 * k:]
    static_scale = torch.tensor([0.01], device=device) if static else None     # clamps the tails
    divided = triton_quant.NormRowQuantizer(k, reciprocal_codes=False)(x, 1e-6, mult, shift, static_scale)
    quantizer, launched = triton_quant.NormRowQuantizer(k), []                  # the default
    launch = quantizer.launcher
    quantizer.launcher = lambda key, grid, args, flags: launched.append(flags) or launch(key, grid, args, flags)
    q, s = quantizer(x, 1e-6, mult, shift, static_scale)
    assert [f["RECIPROCAL_CODES"] for f in launched] == [True]
    assert torch.equal(s, divided[1]) and q.abs().max() == 127 and (q.abs() == 127).sum() >= (1 if static else b * l)
    diff = (q.int() - divided[0].int()).abs()
    assert diff.max() <= 1 and diff.float().mean() < 1e-3 and (static is False or diff.max() == 0)
    q_ref, s_ref = torch_ref.norm_quantize_rows(x, 1e-6, mult, shift, None, static_scale)
    ref_diff = (q.cpu().int() - q_ref.cpu().int()).abs()
    assert ref_diff.max() <= 1 and ref_diff.float().mean() < 0.01
