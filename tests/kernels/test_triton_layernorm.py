"""The float LayerNorm + modulation kernel (Wan's self-attention input, octet/float_fusions.py): against
torch_ref.norm_modulate (fp32 throughout, one rounding) and the host's two ops (LayerNorm, then addcmul, each
rounded), with the modulation shapes a block hands it; and what it refuses."""
import pytest
import torch
import torch.nn.functional as F

from comfyui_octet.kernels import torch_ref
from kernel_testing import randn, requires_triton

pytestmark = requires_triton


def _modulation(kind, b, k, rng, dtype, device):
    if kind == "chunks":        # Wan's e.chunk(6, dim=1): [B, 1, K] views, batch rows 6K apart
        mod = randn((b, 6, k), rng, dtype, device)
        return 1 + mod[:, 1:2], mod[:, 0:1]
    if kind == "shared":
        return 1 + randn((k,), rng, dtype, device), randn((1, 1, k), rng, dtype, device)
    return None, None


@pytest.mark.parametrize("shape", [(2, 5, 48), (1, 9, 300), (3, 7, 1536)])
@pytest.mark.parametrize("modulated", ["chunks", "shared", "none"])
@pytest.mark.parametrize("config", [None, (1, 4), (4, 4), (8, 8)])
def test_norm_modulate_matches_reference_and_host(shape, modulated, config, rng, device):
    from comfyui_octet.kernels.backends import triton_layernorm
    b, l, k = shape
    dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    x = randn(shape, rng, dtype, device, scale=3.0) + 0.5
    mult, shift = _modulation(modulated, b, k, rng, dtype, device)
    kernel = triton_layernorm.NormModulate(config)
    assert kernel.takes(x, mult, shift)
    y = kernel(x, 1e-6, mult, shift)
    assert y.shape == x.shape and y.dtype == dtype and y.is_contiguous()
    ref = torch_ref.norm_modulate(x.cpu(), 1e-6, None if mult is None else mult.cpu(),
                                  None if shift is None else shift.cpu())
    host = F.layer_norm(x, (k,), None, None, 1e-6)
    if mult is not None:
        host = torch.addcmul(shift, host, mult)
    if dtype == torch.float32:
        torch.testing.assert_close(y.cpu(), ref, rtol=1e-5, atol=1e-5)
    else:       # one rounding against torch_ref's one; the host's two roundings within two bf16 steps
        assert ((y.cpu().float() - ref.float()).abs() <= 2 ** -7 * ref.float().abs().clamp_min(1)).all()
    assert ((y.float() - host.float()).abs() <= 2 ** -6 * host.float().abs().clamp_min(1)).all()
    assert y.float().std() > 0.5


def test_norm_modulate_refuses_what_it_cannot_read(rng, device):
    from comfyui_octet.kernels.backends import triton_layernorm
    kernel = triton_layernorm.NormModulate()
    x = randn((2, 4, 16), rng, device=device)
    per_token = randn((2, 4, 16), rng, device=device)
    assert kernel(x, 1e-6, per_token, None) is None                     # not one row per batch entry
    assert kernel(x.transpose(1, 2), 1e-6, None, None) is None          # columns not contiguous
    assert kernel(randn((2, 3, triton_layernorm.MAX_K + 1), rng, device=device), 1e-6) is None
    assert kernel(x, 1e-6, randn((2, 1, 16), rng, torch.float64, device), None) is None   # another dtype
    empty = kernel(torch.empty(0, 4, 16, device=device), 1e-6)
    assert empty.shape == (0, 4, 16)
