"""Attention with INT8 q·kᵀ: q and k rounded to int8 per token, their product on the int8 tensor cores, softmax and
p·v in float (p in v's dtype, the accumulator fp32), as SageAttention does.

Why: attention is where a DiT's step goes once its linears are INT8. On an H200 at 1024² / 81x480x832 it is 65.3 of
Wan 2.1 1.3B's ~130 ms eager step (docs/bench/e2e_profile_wan_h200_2026-12-05_twentythird_comfy029.json) and the
part of Flux's compiled step Inductor cannot fuse. Half of its FLOPs are q·kᵀ; int8 runs them at twice bf16's rate.

Accuracy, what each choice buys:
  * per-token scales for q and k (one per row of head_dim values), not one per tile: a token with large values does
    not coarsen its neighbours' grid, and the kernels' tile sizes stay free (the scales are a row vector per tile);
  * k minus its mean over tokens, per head and channel ("smooth k"): softmax(q·(k - m)ᵀ) = softmax(q·kᵀ) exactly,
    since q·m is the same for every key of a query row; a channel whose keys share a large offset (common in DiTs)
    then no longer sets the scale and leaves the varying part a few int8 steps;
  * sm_scale · log2(e) folds into q's scale, so the softmax runs on exp2 with no extra multiply;
  * p·v stays in v's dtype (bf16/fp16) with an fp32 accumulator: the part where int8 would cost accuracy.
Reference: torch_ref.attention_int8 (same quantization, float math); tests compare both with exact attention.

The two kernels: ``_quantize_qk_kernel`` (q and k in one launch; [B, S, H, D] views read in place, any
token/head/batch strides; int8 codes written [B, H, S, BLOCK_D] contiguous, zero past D, fp32 scales [B, H, S]) and
``_attention_kernel`` (one program per BLOCK_M queries of one (batch, head); v read in place; the output written
[B, S, H, D], the layout ComfyUI's attention returns before its reshape). head_dim is any multiple of 8 up to 128
(SD1.5's 40/80 too), padded to a power of two of at least 32 (BLOCK_D) inside the kernels.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_launch, triton_math, triton_support

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 128     # a [BLOCK_M, head_dim] fp32 accumulator per program; wider heads take the host's attention


@triton.jit
def _quantize_tokens(x_ptr, mean_ptr, codes_ptr, scales_ptr, S, H, sxb, sxs, sxh, pre, bh, t0,
                     HAS_MEAN: tl.constexpr, SCALE_BY_RECIPROCAL: tl.constexpr, BLOCK_T: tl.constexpr,
                     D: tl.constexpr, BLOCK_D: tl.constexpr):
    """Tokens t0 .. t0 + BLOCK_T of head bh: int8 codes (BLOCK_D wide, zero past D) and scales times ``pre``."""
    b, h = bh // H, bh % H
    t = t0 + tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    mask = (t < S)[:, None] & (d < D)[None, :]
    x = tl.load(x_ptr + b.to(tl.int64) * sxb + h * sxh + t[:, None].to(tl.int64) * sxs + d[None, :], mask=mask,
                other=0.0).to(tl.float32)
    if HAS_MEAN:
        x = tl.where(mask, x - tl.load(mean_ptr + bh * D + d, mask=d < D, other=0.0)[None, :], 0.0)
    s = triton_math.scale_from_absmax(tl.max(tl.abs(x), axis=1), SCALE_BY_RECIPROCAL)
    codes = triton_math.round_to_int8(tl.div_rn(x, s[:, None]))
    rows = bh.to(tl.int64) * S + t
    tl.store(codes_ptr + rows[:, None] * BLOCK_D + d[None, :], codes, mask=(t < S)[:, None])
    tl.store(scales_ptr + rows, s * pre, mask=t < S)


@triton.jit
def _quantize_qk_kernel(q_ptr, k_ptr, mean_ptr, qc_ptr, kc_ptr, qs_ptr, ks_ptr, SQ, SK, H, sqb, sqs, sqh,
                        skb, sks, skh, pre, HAS_MEAN: tl.constexpr, SCALE_BY_RECIPROCAL: tl.constexpr,
                        BLOCK_T: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr):
    # q and k in one launch (axis 2): one launch fewer per attention call, which a host-bound step pays for
    t0 = tl.program_id(0) * BLOCK_T
    bh = tl.program_id(1)
    if tl.program_id(2) == 0:
        if t0 < SQ:
            _quantize_tokens(q_ptr, mean_ptr, qc_ptr, qs_ptr, SQ, H, sqb, sqs, sqh, pre, bh, t0, False,
                             SCALE_BY_RECIPROCAL, BLOCK_T, D, BLOCK_D)
    else:
        if t0 < SK:
            _quantize_tokens(k_ptr, mean_ptr, kc_ptr, ks_ptr, SK, H, skb, sks, skh, 1.0, bh, t0, HAS_MEAN,
                             SCALE_BY_RECIPROCAL, BLOCK_T, D, BLOCK_D)


def _configs() -> list:
    """(BLOCK_M, BLOCK_N, warps, stages) candidates. Under the CPU interpreter one small tile (each config costs
    seconds of numpy); on a GPU the flash-attention tutorial's Hopper/Ampere tiles."""
    if triton_support.interpreting():
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
            for m, n, w, s in ((128, 64, 4, 3), (128, 128, 8, 3), (128, 64, 8, 4), (128, 128, 8, 4),
                               (64, 64, 4, 3), (128, 32, 4, 4))]


def _prune(configs, named_args, **kwargs):
    """Query tiles no taller than the queries (short cross-attention sides), at least the shortest tile."""
    sq = named_args["SQ"]
    return triton_support.survivors(configs, [c for c in configs if c.kwargs["BLOCK_M"] <= max(64, sq)])


@triton.jit
def _attend(q, qs, k_base, ks_base, v_base, svs, start, SK, m_i, l_i, acc, d, D: tl.constexpr,
            BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, FP32_PV: tl.constexpr,
            QK_INT8: tl.constexpr):
    """One BLOCK_N block of keys from ``start`` folded into the running (max, sum, accumulator); MASKED: the last,
    partial block (the others load and score without masks). QK_INT8=False: q and k are bf16/fp16 values in the
    codes' layout (bench/attention_int8.py times the same kernel so, to tell the int8 q·kᵀ from the rest)."""
    n = start + tl.arange(0, BLOCK_N)
    if MASKED:
        k = tl.load(k_base + n[:, None] * BLOCK_D + d[None, :], mask=(n < SK)[:, None], other=0)
        ks = tl.load(ks_base + n, mask=n < SK, other=0.0)
        v = tl.load(v_base + n[:, None] * svs + d[None, :], mask=(n < SK)[:, None] & (d < D)[None, :], other=0.0)
    else:
        k = tl.load(k_base + n[:, None] * BLOCK_D + d[None, :])
        ks = tl.load(ks_base + n)
        if BLOCK_D == D:
            v = tl.load(v_base + n[:, None] * svs + d[None, :])
        else:
            v = tl.load(v_base + n[:, None] * svs + d[None, :], mask=(d < D)[None, :], other=0.0)
    # int8 x int8 -> int32 on the tensor cores; the scores in log2 units (q's scale holds sm_scale * log2 e)
    if QK_INT8:
        s = tl.dot(q, tl.trans(k), out_dtype=tl.int32).to(tl.float32) * qs[:, None] * ks[None, :]
    else:
        s = tl.dot(q, tl.trans(k)) * qs[:, None] * ks[None, :]
    if MASKED:
        s = tl.where((n < SK)[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if FP32_PV:     # the CPU interpreter has no bf16 matmul (numpy): the same rounded p, multiplied in fp32
        acc = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), acc * alpha[:, None])
    else:
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return m_new, l_i, acc


@triton.autotune(configs=_configs(), do_bench=triton_support.tuning_bench,
                 key=["SQ_BUCKET", "SK_BUCKET", "D"], prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _attention_kernel(qc_ptr, qs_ptr, kc_ptr, ks_ptr, v_ptr, o_ptr, SQ, SK, H, svb, svs, svh, sob, sos, soh,
                      SQ_BUCKET, SK_BUCKET, FP32_PV: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, QK_INT8: tl.constexpr = True):
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)       # codes are BLOCK_D wide (zero past D); v and the output D
    q_rows = bh.to(tl.int64) * SQ + m
    q = tl.load(qc_ptr + q_rows[:, None] * BLOCK_D + d[None, :], mask=(m < SQ)[:, None], other=0)
    qs = tl.load(qs_ptr + q_rows, mask=m < SQ, other=0.0)      # padding rows: scale 0, scores 0, no NaN
    k_base = kc_ptr + bh.to(tl.int64) * SK * BLOCK_D
    ks_base = ks_ptr + bh.to(tl.int64) * SK
    v_base = v_ptr + b.to(tl.int64) * svb + h * svh       # offsets within one batch entry fit in 32 bits (refusal)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    full = SK - SK % BLOCK_N
    for start in range(0, full, BLOCK_N):
        m_i, l_i, acc = _attend(q, qs, k_base, ks_base, v_base, svs, start, SK, m_i, l_i, acc, d, D, BLOCK_D,
                                BLOCK_N, False, FP32_PV, QK_INT8)
    if full < SK:
        m_i, l_i, acc = _attend(q, qs, k_base, ks_base, v_base, svs, full, SK, m_i, l_i, acc, d, D, BLOCK_D,
                                BLOCK_N, True, FP32_PV, QK_INT8)
    out = acc / l_i[:, None]
    tl.store(o_ptr + b.to(tl.int64) * sob + m[:, None] * sos + h * soh + d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=(m < SQ)[:, None] & (d < D)[None, :])


def _bucket(n: int) -> int:
    """Autotune key for a token count: its power of two (a video's frame count changes S a little, not the tile)."""
    return triton_support.next_power_of_2(max(n, 16))


def refusal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why the kernels do not take [B, S, H, D] views q, k, v (None: they do)."""
    if triton_support.unavailable_reason() is not None:
        return triton_support.unavailable_reason()
    if q.device.type != "cuda" and not triton_support.interpreting():
        return f"tensors on {q.device.type}"
    if q.dtype not in (torch.bfloat16, torch.float16) or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtype {q.dtype}/{k.dtype}/{v.dtype} (bf16 or fp16 only)"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return "not [batch, tokens, heads, head_dim]"
    b, _, h, d = q.shape
    if k.shape[0] != b or k.shape[2:] != q.shape[2:] or v.shape != k.shape:
        return f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} (same batch, heads, head_dim)"
    if b * h > 65535:       # the grid's second axis (CUDA's limit)
        return f"{b} x {h} batch entries x heads (at most 65535)"
    if not 8 <= d <= MAX_HEAD_DIM or d % 8:
        return f"head_dim {d} (a multiple of 8 up to {MAX_HEAD_DIM})"
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        return "head_dim not contiguous"
    # Offsets within one batch entry are 32-bit in the kernels (a view's extent, not its element count: v may be a
    # view of a packed qkv tensor)
    if any(sum((n - 1) * st for n, st in zip(t.shape[1:], t.stride()[1:])) >= 2**31 for t in (q, k, v)):
        return "a batch entry spans more than 2**31 elements"
    return None


def block_d(d: int) -> int:
    """The codes' width: head_dim padded to a power of two, at least 32 (an int8 MMA's K step)."""
    return max(32, triton_support.next_power_of_2(d))


def _quantize_qk(q: torch.Tensor, k: torch.Tensor, mean: torch.Tensor | None, pre: float):
    """Per-token int8 codes [B, H, S, block_d] and fp32 scales [B, H, S] of the [B, S, H, D] views q and k (q's
    scales times ``pre``; k minus ``mean`` [B, H, D] first if given), in one launch."""
    b, sq, h, d = q.shape
    sk, bd = k.shape[1], block_d(d)
    qc = torch.empty((b, h, sq, bd), dtype=torch.int8, device=q.device)
    kc = torch.empty((b, h, sk, bd), dtype=torch.int8, device=q.device)
    qs = torch.empty((b, h, sq), dtype=torch.float32, device=q.device)
    ks = torch.empty((b, h, sk), dtype=torch.float32, device=q.device)
    block = max(1, min(64, 8192 // bd))
    key = (q.dtype, d, mean is not None) + triton_launch.facts(q, k, sq, sk, h, *q.stride()[:3], *k.stride()[:3])
    flags = dict(HAS_MEAN=mean is not None, SCALE_BY_RECIPROCAL=q.device.type == "cuda", BLOCK_T=block, D=d,
                 BLOCK_D=bd, num_warps=4)
    grid = (triton_support.cdiv(max(sq, sk), block), b * h, 2)
    triton_launch.shared(_quantize_qk_kernel, "attention_quantize")(
        key, lambda meta: grid,
        lambda meta: (q, k, mean if mean is not None else qs, qc, kc, qs, ks, sq, sk, h, *q.stride()[:3],
                      *k.stride()[:3], float(pre)), flags)
    return qc, qs, kc, ks


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
              smooth_k: bool = True) -> torch.Tensor:
    """softmax(q·kᵀ · scale) · v with q·kᵀ in int8, for [B, S, H, D] views (q has SQ tokens, k and v SK); the
    output is [B, SQ, H, D], contiguous. The caller checks ``refusal`` first."""
    b, sq, h, d = q.shape
    sk = k.shape[1]
    scale = d ** -0.5 if scale is None else float(scale)
    out = torch.empty((b, sq, h, d), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    if sk == 0:
        return out.zero_()
    # [B, H, D], read as contiguous rows of D by the quantizer (torch's reduction gives that; .contiguous() says so)
    mean = torch.mean(k, dim=1, dtype=torch.float32).contiguous() if smooth_k else None
    qc, qs, kc, ks = _quantize_qk(q, k, mean, scale * LOG2E)
    key = (q.dtype, d, _bucket(sq), _bucket(sk)) + triton_launch.facts(
        v, out, sq, sk, h, v.stride(0), v.stride(1), v.stride(2))
    args = kernel_args(qc, qs, kc, ks, v, out)
    triton_launch.shared(_attention_kernel, "attention_int8")(
        key, lambda meta: (triton_support.cdiv(sq, meta["BLOCK_M"]), b * h), lambda meta: args, kernel_flags(d))
    return out


def kernel_flags(d: int, qk_int8: bool = True) -> dict:
    """``_attention_kernel``'s constexprs that its tile config does not set, defaults too: triton_launch's direct
    launches need each one named (bench/attention_int8.py launches with them as well)."""
    return dict(FP32_PV=triton_support.interpreting(), D=d, BLOCK_D=block_d(d), QK_INT8=qk_int8)


def kernel_args(qc, qs, kc, ks, v: torch.Tensor, out: torch.Tensor) -> tuple:
    """``_attention_kernel``'s runtime arguments in its order, for codes/scales from ``_quantize_qk``, the [B, SK, H, D]
    view v and the [B, SQ, H, D] output (bench/attention_int8.py launches the kernel directly with them too)."""
    sq, h, sk = out.shape[1], out.shape[2], v.shape[1]
    return (qc, qs, kc, ks, v, out, sq, sk, h, v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1),
            out.stride(2), _bucket(sq), _bucket(sk))

