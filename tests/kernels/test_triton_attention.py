"""INT8 q·kᵀ attention (kernels/backends/triton_attention.py): against torch_ref.attention_int8 (the same
quantization in float: only accumulation order and exp2 differ) and against exact attention (the accuracy the
quantization costs), in the layouts ComfyUI hands it; and what it refuses."""
import pytest
import torch
import torch.nn.functional as F

from comfyui_octet.kernels import torch_ref
from kernel_testing import randn, requires_triton

pytestmark = requires_triton


def _exact(q, k, v, scale=None):
    out = F.scaled_dot_product_attention(q.float().transpose(1, 2), k.float().transpose(1, 2),
                                         v.float().transpose(1, 2), scale=scale)
    return out.transpose(1, 2)


def _inputs(b, sq, sk, h, d, rng, device, dtype=torch.bfloat16, k_offset=0.0):
    q = randn((b, sq, h, d), rng, dtype, device, scale=2.0)
    k = randn((b, sk, h, d), rng, dtype, device, scale=2.0)
    if k_offset:      # a channel offset shared by every key (what smoothing removes)
        k = (k.float() + k_offset * randn((1, 1, h, d), rng, torch.float32, device)).to(dtype)
    v = randn((b, sk, h, d), rng, dtype, device)
    return q, k, v


def _cosine(a, b):
    return F.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0).item()


@pytest.mark.parametrize("shape", [(1, 40, 40, 2, 64), (2, 33, 70, 3, 32), (1, 64, 128, 1, 128), (1, 5, 9, 2, 16)])
@pytest.mark.parametrize("smooth_k", [True, False])
def test_attention_matches_reference(shape, smooth_k, rng, device):
    from comfyui_octet.kernels.backends import triton_attention
    b, sq, sk, h, d = shape
    q, k, v = _inputs(b, sq, sk, h, d, rng, device, k_offset=4.0)
    assert triton_attention.refusal(q, k, v) is None
    out = triton_attention.attention(q, k, v, smooth_k=smooth_k)
    assert out.shape == (b, sq, h, d) and out.dtype == q.dtype and out.is_contiguous()
    ref = torch_ref.attention_int8(q.cpu(), k.cpu(), v.cpu(), smooth_k=smooth_k)
    torch.testing.assert_close(out.cpu().float(), ref.float(), rtol=2e-2, atol=2e-2)
    exact = _exact(q.cpu(), k.cpu(), v.cpu())
    # int8 q·kᵀ keeps the output's direction to 3-4 nines; smoothing is what keeps it there with offset keys
    assert _cosine(out.cpu(), exact) > (0.999 if smooth_k else 0.99)
