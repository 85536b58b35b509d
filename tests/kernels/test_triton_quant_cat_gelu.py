"""Flux single-block linear2 input: per-token INT8 of cat(attn, GELU(mlp)) without the cat, against
torch_ref.cat_gelu_quantize_rows. The kernel's fp32 GELU and torch's differ in the last bit, so a
code may move by one at a rounding tie (a small fraction of codes) and a scale by an ulp."""
import pytest
import torch

from comfyui_octet.kernels import torch_ref
from kernel_testing import positive, randn, requires_triton

pytestmark = requires_triton

# (M, K1, K2): tiles straddling the attn/mlp boundary, K2 not a tile multiple, one short row.
SHAPES = [(9, 41, 341), (3, 300, 1200), (1, 8, 24), (5, 1024, 3000)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("smoothed", [False, True])
def test_cat_gelu_quantize_matches_reference(shape, dtype, smoothed, rng, device):
    from comfyui_octet.kernels.backends import triton_quant
    m, k1, k2 = shape
    attn = randn((m, k1), rng, dtype, device, scale=0.5)
    # mlp as a column slice of a wider linear1 output, as in Flux (strided rows).
    fused = randn((m, k2 + 7), rng, dtype, device, scale=2.0)
    mlp = fused[:, 7:]
    smooth = positive(k1 + k2, rng, device) if smoothed else None
    q, s = triton_quant.quantize_rows_cat_gelu(attn, mlp, smooth)
    q_ref, s_ref = torch_ref.cat_gelu_quantize_rows(attn, mlp, smooth)
    assert q.shape == (m, k1 + k2) and q.dtype == torch.int8 and s.shape == (m,)
    torch.testing.assert_close(s.cpu(), s_ref.reshape(-1).cpu(), rtol=1e-6, atol=0)
    diff = (q.cpu().int() - q_ref.cpu().int()).abs()
    assert diff.max() <= 1 and diff.float().mean() < 0.01
    # Both halves carry signal: the attn half is not all zeros after quantization.
    assert q[:, :k1].abs().float().mean() > 1 and q[:, k1:].abs().float().mean() > 1


@pytest.mark.parametrize("head", [True, False])
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("config", [None, (512, 4)])    # the default (one tile for 240, two sweeps for 300), one tile
def test_gelu_quantizer_head_and_static(head, static, config, rng, device):
    """The prepared quantizer an MLP's fc2 (no head) and Flux's linear2 (attn head) use, with dynamic
    and static scales, fed [B, L, K] activations as the model produces them, called twice with
    different M (the second call goes through the recorded direct launch on a GPU)."""
    from comfyui_octet.kernels.backends import triton_quant
    k1, k2 = (40, 200) if head else (0, 300)
    smooth = positive(k1 + k2, rng, device)
    quantizer = triton_quant.GeluRowQuantizer(k1, k2, smooth, config)
    assert quantizer.flags[False, False]["ONE_TILE"] == (config is not None or head)
    for b, l in ((2, 5), (1, 3)):
        attn = randn((b, l, k1), rng, torch.bfloat16, device, scale=0.5) if head else None
        wide = randn((b, l, k2 + 9), rng, torch.bfloat16, device, scale=2.0)
        pre = wide[..., 9:]
        static_scale = torch.tensor([0.03], device=device) if static else None
        q, s = quantizer(attn, pre, static_scale)
        q_ref, s_ref = torch_ref.cat_gelu_quantize_rows(None if attn is None else attn.reshape(-1, k1),
                                                        pre.reshape(-1, k2), smooth, static_scale)
        assert q.shape == (b * l, k1 + k2) and s.numel() == (1 if static else b * l)
        torch.testing.assert_close(s.cpu().reshape(-1), s_ref.reshape(-1).cpu(), rtol=1e-6, atol=0)
        diff = (q.cpu().int() - q_ref.cpu().int()).abs()
        assert diff.max() <= 1 and diff.float().mean() < 0.01
        assert q.abs().float().mean() > 1
    with pytest.raises(ValueError, match="head"):
        quantizer(randn((3, k1 + 1), rng, device=device), randn((3, k2), rng, device=device))


def test_cat_gelu_rejects_mismatched_rows(rng, device):
    from comfyui_octet.kernels.backends import triton_quant
    with pytest.raises(ValueError, match="share M"):
        triton_quant.quantize_rows_cat_gelu(randn((3, 8), rng, device=device), randn((4, 8), rng, device=device))
    with pytest.raises(ValueError, match="smooth has"):
        triton_quant.quantize_rows_cat_gelu(randn((3, 8), rng, device=device), randn((3, 8), rng, device=device),
                                            torch.ones(5, device=device))


@pytest.mark.parametrize("static", [False, True])
def test_codes_by_the_scales_reciprocal_stay_within_a_code_of_the_division(static, rng, device):
    """``reciprocal_codes`` (the default; dynamic whole-row tiles): codes from v times 1/scale, unclamped, at Flux's
    single-block width. The scales are the division's; a code moves by at most one, only where v / scale is near a
    half; static scales keep the division (and the clamp a static scale needs)."""
    from comfyui_octet.kernels.backends import triton_quant
    dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    attn = randn((6, 3072), rng, dtype, device, scale=0.5)
    pre = randn((6, 12288 + 16), rng, dtype, device, scale=2.0)[:, 16:]
    static_scale = torch.tensor([0.01], device=device) if static else None     # clamps GELU's tail
    divided = triton_quant.GeluRowQuantizer(3072, 12288, reciprocal_codes=False)(attn, pre, static_scale)
    quantizer = triton_quant.GeluRowQuantizer(3072, 12288)          # the default
    assert quantizer.flags[static, False]["RECIPROCAL_CODES"] and quantizer.flags[static, False]["ONE_TILE"]
    q, s = quantizer(attn, pre, static_scale)
    q_ref, s_ref = torch_ref.cat_gelu_quantize_rows(attn, pre, None, static_scale)
    assert torch.equal(s, divided[1]) and q.abs().max() == 127 and (q.abs() == 127).sum() >= 6
    diff = (q.int() - divided[0].int()).abs()
    assert diff.max() <= 1 and diff.float().mean() < 1e-3 and (static is False or diff.max() == 0)
    ref_diff = (q.cpu().int() - q_ref.cpu().int()).abs()
    assert ref_diff.max() <= 1 and ref_diff.float().mean() < 0.01
    torch.testing.assert_close(s.cpu().reshape(-1), s_ref.reshape(-1).cpu(), rtol=1e-6, atol=0)


def test_the_recip_codes_switch_reaches_a_plans_gelu_quantizer(monkeypatch, rng, device):
    """OCTET_RECIP_CODES=0 (bench/e2e.py's octet_dynamic_divided) is read when a plan makes a call site's GELU
    quantizer: that quantizer computes codes by the division, one made with the switch unset or on by the reciprocal;
    the layer's outputs agree to within a code's worth."""
    import comfyui_octet.octet as octet
    torch.manual_seed(0)
    linear = torch.nn.Linear(48, 8).to(device)
    head, pre = randn((5, 16), rng, device=device, scale=0.5), randn((5, 32), rng, device=device, scale=2.0)
    outs, flags = [], []
    for value in ("0", None):
        if value is None:
            monkeypatch.delenv("OCTET_RECIP_CODES")
        else:
            monkeypatch.setenv("OCTET_RECIP_CODES", value)
        run = octet.modules.QuantLinear.from_float(linear, "dynamic", backend="triton").plan(head.new_zeros(5, 48)).run
        outs.append(run.gelu_input(head, pre, None))
        flags.append(run._gelu_quantizers[16].flags[False, head.is_cuda]["RECIPROCAL_CODES"])
    assert flags == [False, True]
    ref = torch.nn.functional.linear(torch.cat([head, torch.nn.functional.gelu(pre, approximate="tanh")], 1),
                                     linear.weight, linear.bias)
    step = ref.abs().max().item() / 127
    assert (outs[0] - outs[1]).abs().max() < 2 * step and (outs[1] - ref).abs().max() < 0.05 * ref.abs().max()
