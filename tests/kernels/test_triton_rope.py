"""Flux's q/k preparation (QK RMSNorm + RoPE) in one kernel, against torch_ref.qk_norm_rope (the host's own
ops): exact up to one rounding step of the output dtype where the kernel's rsqrt / sums differ from torch's
in the last bit."""
import pytest
import torch
import torch.nn.functional as F

from comfyui_octet.kernels import torch_ref
from kernel_testing import randn, requires_triton

pytestmark = requires_triton


def flux_freqs(batch, length, d, device, theta=10000):
    """Flux's pe layout [B, 1, L, D/2, 2, 2] (comfy.ldm.flux.math.rope: cos, -sin, sin, cos) at positions
    0..L-1 (one axis: the kernel reads any values in that layout)."""
    pos = torch.arange(length, dtype=torch.float64, device=device)[None].expand(batch, length) * 1.7
    scale = torch.linspace(0, (d - 2) / d, steps=d // 2, dtype=torch.float64, device=device)
    out = torch.einsum("...n,d->...nd", pos, 1.0 / theta ** scale)
    out = torch.stack([torch.cos(out), -torch.sin(out), torch.sin(out), torch.cos(out)], dim=-1)
    return out.reshape(batch, length, d // 2, 2, 2)[:, None].float()


def qkv_views(b, length, h, d, rng, dtype, device):
    """q, k, v as Flux's blocks make them: strided views of one [B, L, 3*H*D] projection output."""
    qkv = randn((b, length, 3 * h * d), rng, dtype, device, scale=2.0)
    return qkv.view(b, length, 3, h, d).permute(2, 0, 3, 1, 4)


def ulps(out, ref):
    """|out - ref| in units of ref's dtype's rounding step at ref's magnitude, or at 1 below it: the values
    are RMS-normalised (about 1), and a rotation can cancel them to near 0, where a last-bit difference of
    the normalised input is many steps of the small output."""
    step = torch.finfo(ref.dtype).eps * ref.float().abs().clamp_min(1.0)
    return ((out.float() - ref.float()).abs() / step)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lengths", [(37,), (5, 40)])
@pytest.mark.parametrize("batch_freqs", [1, 2])
# The default (on CPU the interpreter's own, 64 tokens a program), the GPU's, and 3 heads over two programs.
@pytest.mark.parametrize("config", [None, "gpu", (16, 2, 2)])
def test_qk_norm_rope_matches_host_ops(dtype, lengths, batch_freqs, config, rng, device):
    from comfyui_octet.kernels.backends import triton_rope
    config = triton_rope.CONFIG if config == "gpu" else config
    if dtype == torch.bfloat16 and not str(device).startswith("cuda"):
        pytest.skip("Triton's CPU interpreter truncates fp32 -> bf16 (GPUs round to nearest): bf16 runs on a GPU")
    b, h, d = 2, 3, 64
    total = sum(lengths)
    freqs = flux_freqs(batch_freqs, total, d, device)
    segments, refs_q, refs_k = [], [], []
    offset = 0
    for i, length in enumerate(lengths):
        q, k, _ = qkv_views(b, length, h, d, rng, dtype, device)
        wq = 1 + 0.3 * randn((d,), rng, dtype, device)
        wk = 1 + 0.3 * randn((d,), rng, dtype, device)
        eps_q, eps_k = 1e-6, (torch.finfo(dtype).eps if i else 1e-6)   # 0.29's torch RMSNorm: eps=None -> finfo
        assert triton_rope.takes(q, wq, freqs) and triton_rope.takes(k, wk, freqs)
        segments.append((q, k, wq, wk, eps_q, eps_k))
        refs_q.append(torch_ref.qk_norm_rope(q, wq, eps_q, freqs, offset))
        refs_k.append(torch_ref.qk_norm_rope(k, wk, eps_k, freqs, offset))
        offset += length
    for _ in range(2):                        # the second call goes through the recorded direct launch on a GPU
        out_q, out_k = triton_rope.qk_norm_rope(segments, freqs, dtype, config)
    ref_q, ref_k = torch.cat(refs_q, dim=2), torch.cat(refs_k, dim=2)
    assert out_q.shape == (b, h, total, d) and out_q.is_contiguous() and out_q.dtype == dtype
    for out, ref in ((out_q, ref_q), (out_k, ref_k)):
        err = ulps(out, ref)
        # bf16: a step is 2**-8, the kernel's fp32 differences rarely reach it. fp32: the GPU's approximate
        # rsqrt and another summation order, a few steps of 2**-23, mixed by the rotation.
        assert err.max() <= (4 if dtype == torch.bfloat16 else 64), err.max()
        assert (err > 0.5).float().mean() < (0.02 if dtype == torch.bfloat16 else 0.5)
    # Not the identity: the rotation moved the normalised values, and a wrong pairing would not match.
    plain = torch.nn.functional.rms_norm(segments[0][0], (d,), segments[0][2].to(dtype), 1e-6)
    assert (ref_q[:, :, :lengths[0]].float() - plain.float()).abs().mean() > 0.1


def test_takes_refuses_what_it_cannot_read(rng, device):
    from comfyui_octet.kernels.backends import triton_rope
    q, _, _ = qkv_views(1, 8, 2, 64, rng, torch.float32, device)
    w = torch.ones(64, device=device)
    freqs = flux_freqs(1, 8, 64, device)
    assert triton_rope.takes(q, w, freqs)
    assert not triton_rope.takes(q, torch.ones(32, device=device), freqs)          # weight of another width
    assert not triton_rope.takes(q, w, freqs.double())                              # freqs not fp32
    assert not triton_rope.takes(q, w, freqs.expand(1, 2, 8, 32, 2, 2))             # per-head freqs
    assert not triton_rope.takes(q[..., :48], w[:48], flux_freqs(1, 8, 48, device))  # D not a power of two
    assert not triton_rope.takes(q.transpose(-1, -2), w, freqs)                      # strided head dim


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lengths", [(11,), (4, 21)])
def test_rms_norm_heads_matches_rms_norm_and_cat(dtype, lengths, rng, device):
    """SD3's ln_q on the [B, L, H, D] views of each stream's qkv, then MMDiT's cat along the tokens."""
    from comfyui_octet.kernels.backends import triton_rope
    if dtype == torch.bfloat16 and not str(device).startswith("cuda"):
        pytest.skip("Triton's CPU interpreter truncates fp32 -> bf16 (GPUs round to nearest): bf16 runs on a GPU")
    b, h, d = 2, 3, 64
    segments, refs = [], []
    for length in lengths:
        qkv = randn((b, length, 3 * h * d), rng, dtype, device, scale=2.0)
        q = qkv.reshape(b, length, 3, h, d).movedim(2, 0)[0]          # mmdit.split_qkv
        w = 1 + 0.3 * randn((d,), rng, dtype, device)
        assert triton_rope.takes_rows(q, w)
        segments.append((q, w, 1e-6))
        refs.append(torch.nn.functional.rms_norm(q, (d,), w, 1e-6))
    for _ in range(2):
        out = triton_rope.rms_norm_heads(segments, dtype)
    ref = torch.cat(refs, dim=1)
    assert out.shape == (b, sum(lengths), h, d) and out.is_contiguous()
    err = ulps(out, ref)
    assert err.max() <= (2 if dtype == torch.bfloat16 else 64), err.max()
    assert (err > 0.5).float().mean() < (0.02 if dtype == torch.bfloat16 else 0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lengths, with_v", [((4, 21), True), ((13,), False)])
def test_qkv_heads_matches_split_rms_norm_and_cat(dtype, lengths, with_v, rng, device):
    """SD3's joint attention inputs: split_qkv of each stream's projection, ln_q / ln_k (each stream its own
    weights), the streams' cat; v copied bit for bit."""
    from comfyui_octet.kernels.backends import triton_rope
    if dtype == torch.bfloat16 and not str(device).startswith("cuda"):
        pytest.skip("Triton's CPU interpreter truncates fp32 -> bf16 (GPUs round to nearest): bf16 runs on a GPU")
    b, h, d = 2, 3, 64
    segments, parts = [], []
    for length in lengths:
        qkv = randn((b, length, 3 * h * d), rng, dtype, device, scale=2.0)
        wq, wk = (1 + 0.3 * randn((d,), rng, dtype, device) for _ in range(2))
        segments.append((qkv, wq, wk, 1e-6, 1e-5))
        parts.append(qkv.reshape(b, length, 3, h, d).movedim(2, 0))      # mmdit.split_qkv
    prep = triton_rope.QKVHeads(h, with_v)
    assert prep.takes(tuple(segments))
    for _ in range(2):
        q, k, v = prep(tuple(segments))
    ref_q = torch.cat([F.rms_norm(p[0], (d,), s[1], s[3]) for p, s in zip(parts, segments)], 1).flatten(2)
    ref_k = torch.cat([F.rms_norm(p[1], (d,), s[2], s[4]) for p, s in zip(parts, segments)], 1).flatten(2)
    for out, ref in ((q, ref_q), (k, ref_k)):
        assert out.shape == (b, sum(lengths), h * d) and out.dtype == dtype
        err = ulps(out, ref)
        assert err.max() <= (2 if dtype == torch.bfloat16 else 64), err.max()
        assert (err > 0.5).float().mean() < (0.02 if dtype == torch.bfloat16 else 0.5)
    assert v is None if not with_v else torch.equal(v, torch.cat([p[2] for p in parts], 1))


def wan_freqs(batch, length, d, device):
    """Wan's rope layout [B, L, 1, D/2, 2, 2] (EmbedND's output moved to tokens-first) at positions 0..L-1."""
    return flux_freqs(batch, length, d, device).movedim(1, 2).contiguous()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 37, 3, 64), (1, 70, 2, 32)])      # (B, L, heads, head dim)
@pytest.mark.parametrize("batch_freqs", [1, 2])
@pytest.mark.parametrize("config", [None, "gpu"])
def test_row_norm_rope_matches_wans_host_ops(dtype, shape, batch_freqs, config, rng, device):
    """Wan's q/k: RMSNorm over the whole projection width (all heads), then each head's RoPE."""
    from comfyui_octet.kernels.backends import triton_rope
    if dtype == torch.bfloat16 and not str(device).startswith("cuda"):
        pytest.skip("Triton's CPU interpreter truncates fp32 -> bf16 (GPUs round to nearest): bf16 runs on a GPU")
    b, length, h, d = shape
    batch_freqs = min(batch_freqs, b)
    x = randn((b, length, h * d), rng, dtype, device, scale=2.0) + 0.3
    w = 1 + 0.3 * randn((h * d,), rng, dtype, device)
    freqs = wan_freqs(batch_freqs, length, d, device)
    assert triton_rope.takes_row_rope(x, w, freqs, h)
    for _ in range(2):                        # the second call goes through the recorded direct launch on a GPU
        out = triton_rope.row_norm_rope(x, w, 1e-6, freqs, h, triton_rope.ROW_CONFIG if config == "gpu" else None)
    ref = torch_ref.row_norm_rope(x, w, 1e-6, freqs, h)
    assert out.shape == (b, length, h, d) and out.is_contiguous() and out.dtype == dtype
    err = ulps(out, ref)
    assert err.max() <= (4 if dtype == torch.bfloat16 else 64), err.max()
    assert (err > 0.5).float().mean() < (0.02 if dtype == torch.bfloat16 else 0.5)
    # The norm spans the heads (a per-head norm differs), and the rotation moved the values.
    per_head = torch_ref.qk_norm_rope(x.view(b, length, h, d).transpose(1, 2), w.view(h, d)[0], 1e-6,
                                      freqs.movedim(1, 2)).transpose(1, 2)
    assert (per_head.float() - ref.float()).abs().mean() > 1e-2
    plain = torch.nn.functional.rms_norm(x, (h * d,), w, 1e-6).view(b, length, h, d)
    assert (ref.float() - plain.float()).abs().mean() > 0.1


def test_takes_row_rope_refuses_what_it_cannot_read(rng, device):
    from comfyui_octet.kernels.backends import triton_rope
    x = randn((2, 8, 3 * 64), rng, torch.float32, device)
    w = torch.ones(3 * 64, device=device)
    freqs = wan_freqs(1, 8, 64, device)
    assert triton_rope.takes_row_rope(x, w, freqs, 3)
    assert not triton_rope.takes_row_rope(x, w, freqs, 4)                        # 192 / 4 = 48: not a power of two
    assert not triton_rope.takes_row_rope(x, w[:64], freqs, 3)                    # weight of another width
    assert not triton_rope.takes_row_rope(x, w, freqs.double(), 3)                # freqs not fp32
    assert not triton_rope.takes_row_rope(x, w, wan_freqs(1, 9, 64, device), 3)   # another length
    assert not triton_rope.takes_row_rope(x, w, flux_freqs(1, 8, 64, device), 3)  # Flux's layout
    assert not triton_rope.takes_row_rope(x[..., ::2], w[::2], wan_freqs(1, 8, 32, device), 3)   # strided row
