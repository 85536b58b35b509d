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


def _inputs(b, sq, sk, h, d, rng, device, dtype=torch.bfloat16, k_offset=0.0):  # [B, S, H, D] each
    q = randn((b, sq, h, d), rng, dtype, device, scale=2.0)
    k = randn((b, sk, h, d), rng, dtype, device, scale=2.0)
    if k_offset:      # a channel offset shared by every key (what smoothing removes)
        k = (k.float() + k_offset * randn((1, 1, h, d), rng, torch.float32, device)).to(dtype)
    v = randn((b, sk, h, d), rng, dtype, device)
    return q, k, v


def _cosine(a, b):
    return F.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0).item()


@pytest.mark.parametrize("shape", [(1, 40, 40, 2, 64), (2, 33, 70, 3, 32), (1, 64, 128, 1, 128), (1, 5, 9, 2, 16),
                                   (1, 37, 64, 2, 40), (1, 20, 30, 1, 80)])
@pytest.mark.parametrize("smooth_k", [True, False])
def test_attention_matches_reference(shape, smooth_k, rng, device):
    from comfyui_octet.kernels.backends import triton_attention
    b, sq, sk, h, d = shape
    q, k, v = _inputs(b, sq, sk, h, d, rng, device, k_offset=20.0)
    assert triton_attention.refusal(q, k, v) is None
    out = triton_attention.attention(q, k, v, smooth_k=smooth_k)
    assert out.shape == (b, sq, h, d) and out.dtype == q.dtype and out.is_contiguous()
    # the reference on the same device: CUDA divides by 127 as a multiply by its reciprocal, the CPU divides, and the
    # kernel follows the device (triton_math.scale_from_absmax); one scale's last bit flips a code, and unsmoothed
    # keys 20x offset turn one code into a 0.09 output change (seen on an H100 with a CPU reference)
    ref = torch_ref.attention_int8(q, k, v, smooth_k=smooth_k).cpu()
    torch.testing.assert_close(out.cpu().float(), ref.float(), rtol=2e-2, atol=2e-2)
    exact = _exact(q.cpu(), k.cpu(), v.cpu())
    # int8 q·kᵀ keeps the output's direction to 3-4 nines with keys offset 20x their spread per channel when k is
    # smoothed (measured 0.99983-0.99984 at D 64/128); without, the offset sets the keys' grid (0.9905-0.992)
    cosine = _cosine(out.cpu(), exact)
    if smooth_k:
        assert cosine > 0.9995
    else:
        assert 0.95 < cosine < 0.9995 or sk <= 9


def test_views_of_a_packed_qkv_tensor(rng, device):
    """Flux and SD3 hand over q, k, v as views of one [B, S, 3, H, D] projection output: read in place."""
    from comfyui_octet.kernels.backends import triton_attention
    qkv = randn((2, 50, 3, 2, 64), rng, torch.bfloat16, device, scale=2.0)
    q, k, v = qkv.unbind(2)
    assert not v.is_contiguous() and triton_attention.refusal(q, k, v) is None
    out = triton_attention.attention(q, k, v)
    ref = triton_attention.attention(q.contiguous(), k.contiguous(), v.contiguous())
    assert torch.equal(out, ref)
    assert _cosine(out.cpu(), _exact(q.cpu(), k.cpu(), v.cpu())) > 0.999


@pytest.mark.parametrize("case,reason", [
    ("fp32", "bf16 or fp16 only"),
    ("head_dim", "head_dim 36"),
    ("heads", "same batch, heads, head_dim"),
    ("strided", "head_dim not contiguous"),
    ("grid", "at most 65535"),
])
def test_refusals_name_what_the_kernel_does_not_take(case, reason, rng, device):
    from comfyui_octet.kernels.backends import triton_attention
    d = 36 if case == "head_dim" else 64
    q, k, v = _inputs(1, 8, 8, 2, d, rng, device, dtype=torch.float32 if case == "fp32" else torch.bfloat16)
    if case == "heads":
        k, v = k[:, :, :1], v[:, :, :1]
    if case == "strided":
        q = q.transpose(-1, -2).contiguous().transpose(-1, -2)
    if case == "grid":       # views of one row each: the check reads shapes, not memory
        q, k, v = (t[:1, :1, :1].expand(65536, 1, 1, 64) for t in (q, k, v))
    assert reason in triton_attention.refusal(q, k, v)


def test_empty_keys_and_queries(rng, device):
    from comfyui_octet.kernels.backends import triton_attention
    q, k, v = _inputs(1, 0, 8, 2, 64, rng, device)
    assert triton_attention.attention(q, k, v).shape == (1, 0, 2, 64)


def test_every_launch_names_all_its_constexprs(rng, device, monkeypatch):
    """triton_launch's direct path (GPU only) learns a launch from its runtime arguments plus flags + the autotuned
    config; a constexpr in neither (a default left out) turns direct launches off. Checked here from the calls."""
    from comfyui_octet.kernels.backends import triton_attention, triton_launch
    real, seen = triton_launch.shared, []

    def recording(kernel, name):
        launcher = real(kernel, name)

        def call(key, grid, build, flags):
            seen.append((launcher.jit, len(build(None)), flags, launcher.autotuned))
            return launcher(key, grid, build, flags)
        return call
    monkeypatch.setattr(triton_launch, "shared", recording)
    q, k, v = _inputs(1, 8, 8, 2, 64, rng, device)
    triton_attention.attention(q, k, v)
    assert len(seen) == 2
    for jit, n_args, flags, autotuned in seen:
        config = set(jit.arg_names) & {"BLOCK_M", "BLOCK_N"} if autotuned else set()
        assert set(jit.arg_names[n_args:]) <= set(flags) | config, (jit.arg_names[n_args:], flags)
