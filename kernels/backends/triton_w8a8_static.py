"""Static (calibrated) W8A8 linear in one launch: the activation is quantized in the GEMM's prologue.

With a static scale the int8 code of x[m, k] depends on x[m, k] alone (no reduction over the row),
so the GEMM can load the float activation tile, quantize it in registers and feed the int8 dot:
no separate quantization kernel and no int8 copy of the activation written to and re-read from
memory. y = acc * static_scale * w_scale[n] (+ bias), the epilogue triton_gemm's W8A8 kernel uses.

Two prologue numerics, a constexpr:
  * ``EXACT``: round(x / smooth[k] / scale) with IEEE divisions, bit for bit what
    torch_ref.quantize_rows (and triton_quant) compute, so the output equals torch_ref.linear_w8a8.
  * fast: round(x * mult[k]) with mult = 1 / (smooth * scale) computed once per layer in fp32
    (``prologue_multiplier``). A multiply instead of two divisions per element per column tile;
    the product can differ from the two quotients by an ulp, which moves a code by 1 only where
    x / smooth / scale lies within an ulp of a .5 rounding boundary: a tiny fraction of elements
    (tests/kernels/test_triton_w8a8_static.py bounds it), each off by exactly one code.
    ``torch_ref``-style mirror: ``quantize_by_multiplier`` below.

Each column tile re-quantizes its rows' activation tiles (N / BLOCK_N times per element): CUDA-core
work beside the tensor-core dots. Measured on H200 (bench/kernels.py --sections fused, 2026-12-01,
docs/BENCHMARKS.md) this loses to the separate quantization pass + W8A8 GEMM in CUDA-graph timing
at 11 of 12 shapes (Flux M=4096: 0.63-0.64x bf16 fast / 0.23-0.24x exact vs 1.24-1.56x), so
ops.linear does not use it; it is kept, tested, for a caller or GPU where it might pay.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ..registry import m_bucket
from ..torch_ref import round_to_grid
from . import triton_support
from .triton_gemm import _grouped_tile, _w8a8_epilogue, check_float_gemm
from .triton_math import round_to_int8



def _cfg(bm, bn, bk, stages, warps, group_m=8):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m},
                         num_stages=stages, num_warps=warps, pre_hook=_set_descriptor_blocks)


_set_descriptor_blocks = triton_support.tma_box_hook("x", "w")


def configs() -> list:
    """int8 dots want K=128 steps on Hopper (one 128-byte swizzled row of int8), but the float A
    tile is twice the bytes of an int8 one, so the shared-memory budget allows fewer stages or
    K=64 steps; both are candidates."""
    if triton_support.interpreting():
        return [_cfg(32, 32, 64, 1, 4, group_m=2)]
    if triton_support.capability()[0] >= 9:
        return [
            _cfg(128, 256, 128, 2, 8), _cfg(128, 256, 64, 3, 8), _cfg(128, 128, 128, 3, 8),
            _cfg(128, 128, 64, 4, 8), _cfg(256, 128, 64, 3, 8), _cfg(128, 128, 128, 3, 4),
            _cfg(64, 128, 128, 4, 4), _cfg(64, 256, 128, 3, 8), _cfg(16, 64, 256, 4, 4),
            _cfg(16, 128, 128, 4, 4), _cfg(32, 64, 256, 4, 4), _cfg(64, 64, 256, 3, 4),
        ]
    return [_cfg(128, 128, 64, 3, 8), _cfg(128, 64, 64, 4, 4), _cfg(64, 128, 64, 4, 4), _cfg(64, 64, 128, 3, 4),
            _cfg(16, 64, 128, 4, 4)]


def _prune(configs_, named_args, **kwargs):
    m = named_args["M"]
    cap = max(16, triton_support.next_power_of_2(m))
    kept = [c for c in configs_ if c.kwargs["BLOCK_M"] <= cap]
    return triton_support.survivors(configs_, kept)




@triton.jit
def _quantize_tile(v, mult_or_smooth_ptr, scale, offs_k, k_mask, HAS_VEC: tl.constexpr, EXACT: tl.constexpr):
    v = v.to(tl.float32)
    if EXACT:
        if HAS_VEC:
            v = tl.div_rn(v, tl.load(mult_or_smooth_ptr + offs_k, mask=k_mask, other=1.0)[None, :])
        v = tl.div_rn(v, scale)
    else:
        if HAS_VEC:
            v = v * tl.load(mult_or_smooth_ptr + offs_k, mask=k_mask, other=0.0)[None, :]
        else:
            v = v * scale  # here: the reciprocal of the static scale
    return round_to_int8(v)


@triton.jit
def _w8a8_static_kernel(x, w, c_ptr, vec_ptr, scale_ptr, w_scale_ptr, bias_ptr, M, N, K, M_BUCKET,
                        stride_xm, stride_wn, stride_cm,
                        HAS_VEC: tl.constexpr, EXACT: tl.constexpr, HAS_BIAS: tl.constexpr, USE_TMA: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # scale_ptr[0]: the static scale (EXACT) or its reciprocal (fast, used when there is no vector).
    if EXACT:
        scale = tl.load(scale_ptr)
    else:
        scale = tl.load(scale_ptr + 1)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    if not USE_TMA:
        x_ptrs = x + (offs_m % M)[:, None] * stride_xm + offs_k[None, :]
        w_ptrs = w + (offs_n % N)[None, :] * stride_wn + offs_k[:, None]
    for k0 in range(0, K, BLOCK_K):
        k_mask = offs_k + k0 < K
        if USE_TMA:
            x_tile = x.load([pid_m * BLOCK_M, k0])
            w_tile = w.load([pid_n * BLOCK_N, k0]).T
        else:
            x_tile = tl.load(x_ptrs, mask=k_mask[None, :], other=0.0)
            w_tile = tl.load(w_ptrs, mask=k_mask[:, None], other=0)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        # Columns past K load as 0 and quantize to 0 (0 / s and 0 * m are 0): they add nothing.
        a_tile = _quantize_tile(x_tile, vec_ptr, scale, offs_k + k0, k_mask, HAS_VEC, EXACT)
        acc = tl.dot(a_tile, w_tile, acc, out_dtype=tl.int32)
    # The epilogue multiplies by a_scale[m * 0] = the static scale (scale_ptr[0]) for every row.
    _w8a8_epilogue(acc, c_ptr, scale_ptr, w_scale_ptr, bias_ptr, scale_ptr, scale_ptr, M, N, stride_cm, 0,
                   pid_m, pid_n, HAS_BIAS, False, False, False, BLOCK_M, BLOCK_N)


_tuned_kernel = triton.autotune(configs=configs(), do_bench=triton_support.tuning_bench,
                                key=["M_BUCKET", "N", "K", "USE_TMA", "EXACT"],
                                prune_configs_by={"early_config_prune": _prune})(_w8a8_static_kernel)


def prologue_multiplier(smooth: torch.Tensor | None, static_scale: torch.Tensor, device) -> torch.Tensor:
    """fp32 [K] = 1 / (smooth * static_scale) for the fast prologue; None-smooth gives [1]. Compute
    once per layer (a caller's plan can keep it); the wrapper computes it when not given."""
    s = static_scale.reshape(1).to(device=device, dtype=torch.float32)
    if smooth is None:
        return torch.reciprocal(s)
    return torch.reciprocal(smooth.reshape(-1).to(device=device, dtype=torch.float32) * s).contiguous()


def quantize_by_multiplier(x2d: torch.Tensor, mult: torch.Tensor) -> torch.Tensor:
    """What the fast prologue computes, in torch (int8 codes of x * mult): the tests' oracle for it."""
    return round_to_grid(x2d.float() * mult.float().reshape(1, -1)).to(torch.int8)


def w8a8_static_gemm(x2d: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                     smooth: torch.Tensor | None, static_scale: torch.Tensor, exact: bool = True,
                     multiplier: torch.Tensor | None = None, config: dict | None = None,
                     use_tma: bool | None = None) -> torch.Tensor:
    """float [M, K] -> quantize with (smooth, static_scale) -> int8 dot with int8 [N, K] -> [M, N] in
    x's dtype. ``exact=True``: equals torch_ref.linear_w8a8(x, q, s, bias, smooth, static_scale).
    ``exact=False``: the multiply prologue (``multiplier`` from prologue_multiplier, else computed).
    ``config`` launches one configuration without the autotuner (keys as in configs())."""
    m, n, k = check_float_gemm(x2d, qweight, w_scale, bias)
    if static_scale is None or static_scale.numel() != 1:
        raise ValueError("the static W8A8 prologue needs one static activation scale")
    if smooth is not None and smooth.numel() != k:
        raise ValueError(f"smooth has {smooth.numel()} entries, activations have K={k}")
    dev = x2d.device
    x2d = x2d.contiguous()
    qweight = qweight.contiguous()
    out = torch.empty((m, n), dtype=x2d.dtype, device=dev)
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.copy_(bias.expand(m, n)) if bias is not None else out.zero_()
    s = static_scale.reshape(1).to(device=dev, dtype=torch.float32)
    if exact:
        scales = torch.cat([s, s])  # [scale, unused]
        vec = smooth.reshape(-1).to(device=dev, dtype=torch.float32).contiguous() if smooth is not None else None
    else:
        mult = multiplier if multiplier is not None else prologue_multiplier(smooth, s, dev)
        if mult.numel() not in (1, k):
            raise ValueError(f"multiplier has {mult.numel()} entries for K={k}")
        mult = mult.reshape(-1).to(device=dev, dtype=torch.float32).contiguous()
        scales = torch.cat([s, mult[:1]])  # [scale for the epilogue, reciprocal for the prologue]
        vec = mult if smooth is not None or mult.numel() > 1 else None
    w_scale = w_scale.reshape(-1).to(device=dev, dtype=torch.float32).contiguous()
    tma = (k % 16 == 0 and x2d.dtype != torch.float32 and (triton_support.is_hopper() or triton_support.interpreting())) \
        if use_tma is None else use_tma
    if tma:
        x_arg = TensorDescriptor.from_tensor(x2d, [16, 16])
        w_arg = TensorDescriptor.from_tensor(qweight, [16, 16])
    else:
        x_arg, w_arg = x2d, qweight
    args = (x_arg, w_arg, out, vec if vec is not None else scales, scales, w_scale,
            bias if bias is not None else w_scale, m, n, k, m_bucket(m), k, k, n)
    flags = dict(HAS_VEC=vec is not None, EXACT=exact, HAS_BIAS=bias is not None, USE_TMA=tma)
    if config is None:
        def grid(meta):
            return (triton_support.cdiv(m, meta["BLOCK_M"]) * triton_support.cdiv(n, meta["BLOCK_N"]),)
        _tuned_kernel[grid](*args, **flags)
    else:
        meta = dict(config)
        if tma:
            _set_descriptor_blocks({"x": x_arg, "w": w_arg, **meta})
        _w8a8_static_kernel[(triton_support.cdiv(m, meta["BLOCK_M"]) * triton_support.cdiv(n, meta["BLOCK_N"]),)](
            *args, **flags, **meta)
    return out


def tuned_configs() -> dict:
    return {str(key): {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
            for key, cfg in _tuned_kernel.cache.items()}
