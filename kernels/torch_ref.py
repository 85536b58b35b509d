"""Reference INT8 numerics in plain torch.

This file is the correctness oracle: every faster backend (Triton, bitsandbytes) is tested
against these functions, and on CPU they are what actually runs. They favour exactness over
speed: integer products are accumulated in int32 (``torch._int_mm``) or float64, both exact
for any K a diffusion model uses, so a mismatch in a test is the kernel's fault, not ours.

Conventions shared by every backend (see ``kernels/__init__.py``):
  * symmetric INT8 in [-127, 127] (no -128, so negation is exact and the grid is symmetric);
  * round half to even (``torch.round``), the same as CUDA's ``rint``;
  * weight scales are per output channel, shape [N, 1], float32;
  * activation scales are per token (row) for linear layers, per sample for convolutions
    (a per-pixel scale would not factor out of the convolution sum), or one static value;
  * ``smooth`` (SmoothQuant) is a per-input-channel divisor applied before quantization.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .operands import ConvGeometry, pair

QMAX = 127.0
# Smallest scale we allow: an all-zero row then quantizes to zeros instead of NaN.
MIN_SCALE = 1e-12


def scale_from_absmax(absmax: torch.Tensor, qmax: float = QMAX) -> torch.Tensor:
    return (absmax.float() / qmax).clamp_min(MIN_SCALE)


def round_to_grid(y: torch.Tensor, qmax: float = QMAX) -> torch.Tensor:
    """Round half to even and clamp to [-qmax, qmax]: the integer codes of ``y`` (already divided by
    its scale), still in y's float dtype."""
    return torch.round(y).clamp_(-qmax, qmax)


def quantize_with_scale(x: torch.Tensor, scale: torch.Tensor, qmax: float = QMAX) -> torch.Tensor:
    """Round x / scale to the symmetric integer grid [-qmax, qmax] (INT8 by default); scale broadcasts."""
    return round_to_grid(x.float() / scale, qmax).to(torch.int8)


def row_scales(x: torch.Tensor) -> torch.Tensor:
    """Dynamic per-token scales [..., 1] (linear layers: one per row of the last dimension)."""
    return scale_from_absmax(x.abs().amax(dim=-1, keepdim=True))


def sample_scales(x: torch.Tensor) -> torch.Tensor:
    """Dynamic per-sample scales [B] (convolutions: a per-pixel scale would not factor out of the sum)."""
    return scale_from_absmax(x.reshape(x.shape[0], -1).abs().amax(dim=1))


def quantize_weight(weight: torch.Tensor, qmax: float = QMAX) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric quantization to [-qmax, qmax] (INT8 by default; QAT's 4-bit
    experiment passes 7), codes in int8. Works for Linear [N, K] and Conv [O, C, kh, kw]."""
    w = weight.detach().float()
    absmax = w.reshape(w.shape[0], -1).abs().amax(dim=1, keepdim=True)
    scale = scale_from_absmax(absmax, qmax)  # [N, 1]
    view = scale.reshape((-1,) + (1,) * (w.dim() - 1))
    return quantize_with_scale(w, view, qmax), scale


def dequantize_weight(qweight: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    view = scale.float().reshape((-1,) + (1,) * (qweight.dim() - 1))
    return (qweight.float() * view).to(dtype)


def smoothed(x: torch.Tensor, smooth: torch.Tensor | None, channel_dim: int) -> torch.Tensor:
    """x / smooth along ``channel_dim``, in fp32: the activation side of SmoothQuant (the weight was
    multiplied by ``smooth``). The one copy: every backend divides through this."""
    x = x.float()
    if smooth is None:
        return x
    shape = [1] * x.dim()
    shape[channel_dim] = -1
    return x / smooth.float().reshape(shape)


def quantize_rows(x2d: torch.Tensor, smooth: torch.Tensor | None = None,
                  static_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize activations [M, K]: per-token dynamic scales [M, 1], or one static scale [1, 1]."""
    xs = smoothed(x2d, smooth, channel_dim=1)
    if static_scale is None:
        scale = row_scales(xs)
    else:
        scale = static_scale.float().reshape(1, 1).to(xs.device)
    return quantize_with_scale(xs, scale), scale


def quantize_per_sample(x: torch.Tensor, smooth: torch.Tensor | None = None,
                        static_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize NCHW activations with one scale per sample (dynamic) or one static scale."""
    xs = smoothed(x, smooth, channel_dim=1)
    if static_scale is None:
        scale = sample_scales(xs)
    else:
        scale = static_scale.float().reshape(1).expand(xs.shape[0]).to(xs.device)
    return quantize_with_scale(xs, scale.reshape(-1, 1, 1, 1)), scale


def int_matmul(a_q: torch.Tensor, b_q_t: torch.Tensor) -> torch.Tensor:
    """Exact int32 product of int8 [M, K] and int8 [N, K]^T."""
    try:
        return torch._int_mm(a_q.contiguous(), b_q_t.t().contiguous())
    except RuntimeError:
        # Some devices/shapes lack _int_mm; float64 holds 127*127*K exactly for K < 2^39.
        return (a_q.double() @ b_q_t.double().t()).to(torch.int32)


def int_conv2d(xq: torch.Tensor, wq: torch.Tensor, stride, padding, dilation, groups: int) -> torch.Tensor:
    """Exact integer convolution of int8 NCHW by int8 OIHW, as im2col + int32 GEMM."""
    if groups != 1 or isinstance(padding, str):
        # float64 holds every partial sum exactly (|sum| < 2^53): slower, but exact.
        return F.conv2d(xq.double(), wq.double(), None, stride, padding, dilation, groups)
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = wq.shape[2:], pair(stride), pair(padding), pair(dilation)
    b, _, h, w = xq.shape
    ho, wo = ConvGeometry.of(stride, padding, dilation).output_size(h, w, kh, kw)
    # unfold needs floats; int8 values survive the float32 round trip exactly.
    cols = F.unfold(xq.float(), (kh, kw), dilation=(dh, dw), padding=(ph, pw), stride=(sh, sw))
    a = cols.transpose(1, 2).reshape(b * ho * wo, -1).to(torch.int8)
    acc = int_matmul(a, wq.reshape(wq.shape[0], -1))
    return acc.reshape(b, ho * wo, -1).transpose(1, 2).reshape(b, -1, ho, wo).contiguous()


def gemm_epilogue(acc: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor,
                  bias: torch.Tensor | None, out_dtype: torch.dtype, gelu: bool = False) -> torch.Tensor:
    """y = acc * x_scale[m] * w_scale[n] (+ bias) in float32 (then GELU, tanh form, with ``gelu``), then cast:
    what kernels fuse."""
    y = acc.float() * x_scale.float().reshape(-1, 1) * w_scale.float().reshape(1, -1)
    if bias is not None:
        y = y + bias.float()
    if gelu:
        y = F.gelu(y, approximate="tanh")
    return y.to(out_dtype)


def linear_w8a8(x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                smooth: torch.Tensor | None = None, static_scale: torch.Tensor | None = None,
                gelu: bool = False) -> torch.Tensor:
    shape = x.shape
    x2d = x.reshape(-1, shape[-1])
    xq, xs = quantize_rows(x2d, smooth, static_scale)
    acc = int_matmul(xq, qweight)
    y = gemm_epilogue(acc, xs.expand(x2d.shape[0], 1), w_scale, bias, x.dtype, gelu)
    return y.reshape(*shape[:-1], qweight.shape[0])


def linear_w8a16(x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor,
                 bias: torch.Tensor | None) -> torch.Tensor:
    w = dequantize_weight(qweight, w_scale, x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


def conv2d_w8a8(x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                stride, padding, dilation, groups: int,
                smooth: torch.Tensor | None = None, static_scale: torch.Tensor | None = None) -> torch.Tensor:
    xq, xs = quantize_per_sample(x, smooth, static_scale)
    acc = int_conv2d(xq, qweight, stride, padding, dilation, groups)
    y = acc.double() * xs.double().reshape(-1, 1, 1, 1) * w_scale.double().reshape(1, -1, 1, 1)
    if bias is not None:
        y = y + bias.double().reshape(1, -1, 1, 1)
    return y.to(x.dtype)


def conv2d_w8a16(x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                 stride, padding, dilation, groups: int) -> torch.Tensor:
    w = dequantize_weight(qweight, w_scale, x.dtype)
    return F.conv2d(x, w, None if bias is None else bias.to(x.dtype), stride, padding, dilation, groups)


# ---- static MLP chain: fc1 -> GELU(tanh) -> fc2, the hidden activation kept in INT8 ----------------
# With a static scale for fc2's input, quantizing the hidden activation needs no reduction over its
# row, so fc1's epilogue can apply the GELU and write int8 codes for fc2 directly: the hidden tensor
# (4x the model width in Flux, SD3, Wan) is never written in float, nor re-read to quantize it.

def gelu_tanh_quantize(h: torch.Tensor, smooth: torch.Tensor | None, static_scale: torch.Tensor) -> torch.Tensor:
    """int8 codes of GELU(h) (tanh form) for the next layer: round(gelu(h) / smooth / scale)."""
    return quantize_rows(F.gelu(h.float(), approximate="tanh"), smooth, static_scale)[0]


def static_mlp(x: torch.Tensor, fc1: tuple, fc2: tuple) -> torch.Tensor:
    """fc2(gelu_tanh(fc1(x))) with both layers static W8A8; each fc is
    (qweight, w_scale, bias, smooth, static_scale). The hidden activation stays in fp32 between
    fc1's epilogue and its quantization, as the fused kernel keeps it in registers."""
    (q1, s1, b1, sm1, sc1), (q2, s2, b2, sm2, sc2) = fc1, fc2
    shape = x.shape
    x2d = x.reshape(-1, shape[-1])
    xq, xs = quantize_rows(x2d, sm1, sc1)
    h = gemm_epilogue(int_matmul(xq, q1), xs.expand(x2d.shape[0], 1), s1, b1, torch.float32)
    hq = gelu_tanh_quantize(h, sm2, sc2)
    hs = sc2.float().reshape(1, 1).to(x.device).expand(x2d.shape[0], 1)
    y = gemm_epilogue(int_matmul(hq, q2), hs, s2, b2, x.dtype)
    return y.reshape(*shape[:-1], q2.shape[0])


def cat_gelu_quantize_rows(attn: torch.Tensor | None, mlp: torch.Tensor, smooth: torch.Tensor | None = None,
                           static_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """INT8 of cat(attn, gelu_tanh(mlp)) (Flux's single-block linear2 input) or of gelu_tanh(mlp) with
    attn None (an MLP's fc2 input), the GELU in fp32 (the fused kernel keeps it in registers; ComfyUI
    rounds it to the activation dtype)."""
    gelu = F.gelu(mlp.float(), approximate="tanh")
    row = gelu if attn is None else torch.cat([attn.float(), gelu], dim=-1)
    return quantize_rows(row, smooth, static_scale)


def modulation_per_batch(t: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether modulation ``t`` (mult or shift) broadcasts over x [B, L, K] / [M, K] as one row per batch
    entry ([B, 1, K]) or one for all: the shapes the fused norm_quantize_rows kernel reads (anything else
    its callers compute in float)."""
    if t.dim() > x.dim() or t.shape[-1] != x.shape[-1]:
        return False
    lead = t.shape[:-1]
    if x.dim() == 3 and t.dim() == 3:
        return lead[1] == 1 and lead[0] in (1, x.shape[0])
    return all(d == 1 for d in lead)


def norm_modulate(x: torch.Tensor, eps: float, mult: torch.Tensor | None = None,
                  shift: torch.Tensor | None = None) -> torch.Tensor:
    """shift + layer_norm(x) * mult (LayerNorm without affine, then the block's modulation) in fp32, rounded once
    to x's dtype: the fused float kernel (triton_layernorm). ComfyUI rounds after the LayerNorm and again after the
    modulation."""
    y = F.layer_norm(x.float(), (x.shape[-1],), None, None, eps)
    if mult is not None:
        y = y * mult.float()
    if shift is not None:
        y = y + shift.float()
    return y.to(x.dtype)


def norm_quantize_rows(x: torch.Tensor, eps: float, mult: torch.Tensor | None = None,
                       shift: torch.Tensor | None = None, smooth: torch.Tensor | None = None,
                       static_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """INT8 rows of shift + layer_norm(x) * mult (LayerNorm without affine, then Flux's / SD3's modulation),
    fp32 throughout (the fused kernel keeps it in registers; ComfyUI rounds each step to the activation
    dtype). x [..., K]; mult and shift broadcast against it."""
    y = F.layer_norm(x.float(), (x.shape[-1],), None, None, eps)
    if mult is not None:
        y = y * mult.float()
    if shift is not None:
        y = y + shift.float()
    return quantize_rows(y.reshape(-1, x.shape[-1]), smooth, static_scale)


def qk_norm_rope(x: torch.Tensor, weight: torch.Tensor, eps: float, freqs: torch.Tensor,
                 offset: int = 0) -> torch.Tensor:
    """Flux's query/key preparation as its host code computes it (comfy.ldm.flux: QKNorm, then apply_rope1):
    RMSNorm over the head dim with the weight cast to x's dtype (output in x's dtype), then the rotary
    embedding in fp32 with ``freqs`` rows ``offset``.. (freqs [B or 1, 1, L_total, D/2, 2, 2]), rounded back
    to x's dtype. x [B, H, L, D]."""
    y = F.rms_norm(x, (x.shape[-1],), weight.to(x.dtype), eps)
    return rope(y, freqs[:, :, offset:offset + x.shape[2]])


def rope(y: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """The host's rotary embedding (comfy.ldm.flux.math apply_rope1): pairs of y's last dim rotated in fp32 by
    ``freqs`` [..., D/2, 2, 2] (broadcast against y's leading dims), rounded back to y's dtype."""
    y_ = y.to(freqs.dtype).reshape(*y.shape[:-1], -1, 1, 2)
    out = freqs[..., 0] * y_[..., 0]
    out.addcmul_(freqs[..., 1], y_[..., 1])
    return out.reshape(*y.shape).type_as(y)


def row_norm_rope(x: torch.Tensor, weight: torch.Tensor, eps: float, freqs: torch.Tensor, heads: int) -> torch.Tensor:
    """Wan's self-attention q (or k) as its host code computes it (comfy.ldm.wan.model.WanSelfAttention: the
    RMSNorm over the projection's whole width, output in x's dtype; ``.view(b, s, n, d)``; apply_rope1 in fp32
    with ``freqs`` [B or 1, L, 1, D/2, 2, 2], rounded back to x's dtype). x [B, L, H*D] -> [B, L, H, D]."""
    b, length, width = x.shape
    return rope(F.rms_norm(x, (width,), weight.to(x.dtype), eps).view(b, length, heads, width // heads), freqs)


def group_norm_silu(x: torch.Tensor, groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                    eps: float, silu: bool = True) -> torch.Tensor:
    """A UNet ResBlock's ``GroupNorm`` then ``SiLU`` as the host computes them (two ops, the GroupNorm's output
    stored in x's dtype); ``silu=False``: the GroupNorm alone."""
    y = F.group_norm(x, groups, weight, bias, eps)
    return F.silu(y) if silu else y


def geglu(h: torch.Tensor) -> torch.Tensor:
    """GEGLU's gate as the host computes it after the projection (comfy.ldm.modules.attention.GEGLU)."""
    x, gate = h.chunk(2, dim=-1)
    return x * F.gelu(gate)


def attention_int8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                   smooth_k: bool = True) -> torch.Tensor:
    """triton_attention.attention's math in float: q and k ([B, S, H, D]) rounded to int8 per token (k minus its
    mean over tokens first), softmax of the dequantized q·kᵀ · scale in fp32, p rounded to v's dtype, p·v in fp32;
    output [B, SQ, H, D] in q's dtype."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    kf = k.float()
    if smooth_k:
        kf = kf - kf.mean(dim=1, keepdim=True)
    qq, qs = quantize_rows(q.float().reshape(-1, q.shape[-1]))
    kq, ks = quantize_rows(kf.reshape(-1, k.shape[-1]))
    qd = (qq.float() * qs).view(q.shape).transpose(1, 2)          # [B, H, SQ, D]
    kd = (kq.float() * ks).view(k.shape).transpose(1, 2)
    p = torch.softmax(qd @ kd.transpose(-1, -2) * scale, dim=-1).to(v.dtype).float()
    return (p @ v.float().transpose(1, 2)).transpose(1, 2).to(q.dtype)
