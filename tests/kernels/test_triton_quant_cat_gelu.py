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


def test_cat_gelu_rejects_mismatched_rows(rng, device):
    from comfyui_octet.kernels.backends import triton_quant
    with pytest.raises(ValueError, match="share M"):
        triton_quant.quantize_rows_cat_gelu(randn((3, 8), rng, device=device), randn((4, 8), rng, device=device))
    with pytest.raises(ValueError, match="smooth has"):
        triton_quant.quantize_rows_cat_gelu(randn((3, 8), rng, device=device), randn((3, 8), rng, device=device),
                                            torch.ones(5, device=device))
