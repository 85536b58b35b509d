"""Activation quantization kernels: float activations -> symmetric INT8 + fp32 scales.

Numerics follow ``torch_ref`` bit for bit: smoothing and scaling use IEEE division
(``tl.div_rn``; Triton's ``/`` on fp32 is an approximate division), scales are
``max(absmax / 127, 1e-12)`` computed the way PyTorch does on the same device, and rounding is
half-to-even (triton_math: the scale rule and the INT8 grid, shared with the GEMM kernels).

Two shapes of activation:
  * rows [M, K] for linear layers: one program per row; rows up to 2048 wide in one tile, longer
    ones in two sweeps (absmax, then quantize; the second re-reads the row from L2), which measured
    faster than holding a long row in registers (see ``row_launch_config``);
  * NCHW for convolutions: one scale per sample (a per-pixel scale would not factor out of the
    convolution sum), written out as NHWC int8, the layout the implicit-GEMM conv reads.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import registry
from . import scratch as scratch_buffers, triton_launch, triton_layernorm, triton_support
from .triton_layernorm import norm_modulate_rows
from .triton_math import codes_by_reciprocal, gelu_tanh, round_to_int8, scale_from_absmax


@triton.jit
def _quantize_row_in_registers(v, mask, q_ptrs, static_ptr, scale_ptr, row, STATIC: tl.constexpr,
                               SCALE_BY_RECIPROCAL: tl.constexpr, RECIPROCAL_CODES: tl.constexpr):
    # A whole row held in registers: its scale (the static one, or from its absmax, stored), then its codes.
    # RECIPROCAL_CODES: dynamic codes by the scale's reciprocal (triton_math.codes_by_reciprocal); static codes
    # keep the division.
    if STATIC:
        scale = tl.load(static_ptr).to(tl.float32)
    else:
        scale = scale_from_absmax(tl.max(tl.abs(v), axis=0), SCALE_BY_RECIPROCAL)
        tl.store(scale_ptr + row, scale)
    if RECIPROCAL_CODES and not STATIC:
        tl.store(q_ptrs, codes_by_reciprocal(v, scale), mask=mask)
    else:
        tl.store(q_ptrs, round_to_int8(tl.div_rn(v, scale)), mask=mask)


@triton.jit
def _quantize_rows_kernel(x_ptr, smooth_ptr, static_ptr, q_ptr, scale_ptr, K, stride_xm,
                          HAS_SMOOTH: tl.constexpr, STATIC: tl.constexpr, ONE_TILE: tl.constexpr,
                          SCALE_BY_RECIPROCAL: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    q_row = q_ptr + row * K
    offs = tl.arange(0, BLOCK_K)
    if ONE_TILE:
        mask = offs < K
        v = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_SMOOTH:
            v = tl.div_rn(v, tl.load(smooth_ptr + offs, mask=mask, other=1.0).to(tl.float32))
        _quantize_row_in_registers(v, mask, q_row + offs, static_ptr, scale_ptr, row, STATIC, SCALE_BY_RECIPROCAL,
                                   False)   # the plain quantizer keeps the division (not timed with the reciprocal)
    else:
        if STATIC:
            scale = tl.load(static_ptr).to(tl.float32)
        else:
            absmax = tl.zeros([BLOCK_K], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                mask = k0 + offs < K
                v = tl.load(x_row + k0 + offs, mask=mask, other=0.0).to(tl.float32)
                if HAS_SMOOTH:
                    v = tl.div_rn(v, tl.load(smooth_ptr + k0 + offs, mask=mask, other=1.0).to(tl.float32))
                absmax = tl.maximum(absmax, tl.abs(v))
            scale = scale_from_absmax(tl.max(absmax, axis=0), SCALE_BY_RECIPROCAL)
            tl.store(scale_ptr + row, scale)
        for k0 in range(0, K, BLOCK_K):
            mask = k0 + offs < K
            v = tl.load(x_row + k0 + offs, mask=mask, other=0.0).to(tl.float32)
            if HAS_SMOOTH:
                v = tl.div_rn(v, tl.load(smooth_ptr + k0 + offs, mask=mask, other=1.0).to(tl.float32))
            tl.store(q_row + k0 + offs, round_to_int8(tl.div_rn(v, scale)), mask=mask)


def row_launch_config(k: int) -> tuple[bool, int, int]:
    """(whole row in one tile?, tile width, warps) for rows of length k. A function so that
    bench/kernels.py and bench/quant_rows_sweep.py can time the alternatives on the GPU.

    Two sweeps over tiles of about a quarter of the row (absmax, then quantize; the second re-reads
    the row from L2) beat holding a long row in registers, since smaller programs keep more loads in
    flight: on an H100 (2026-11-26) K=3072 1024-wide/4 warps 2.29 TB/s vs whole row 1.73, K=6144
    2048/8 2.65 vs 1.88, K=12288 4096/8 2.62 vs 1.60; again on 2026-12-06 (bench/quant_rows_sweep.py,
    one launch each) Flux's 4608 x 3072 18.4 us vs 24.8 whole, Wan's 14,040 x 8960 216 vs 474. Rows up
    to 2048 wide go in one tile, where two sweeps would pad a second, mostly empty tile: Wan's 14,040 x
    1536 whole (2048 lanes, 4 warps) 35.0 us vs 41.2 in two sweeps of 1024.
    """
    block_k = triton_support.next_power_of_2(k)
    if k <= 1024:
        return True, block_k, max(1, min(4, block_k // 256))
    if k <= 2048:
        return True, block_k, 4
    block_k = min(4096, max(1024, block_k // 4))
    return False, block_k, 4 if block_k <= 1024 else 8


def _codes_and_scales(m: int, k: int, device, static_scale: torch.Tensor | None):
    """A quantizer's outputs: int8 codes [M, K] and fp32 scales, [M] fresh for dynamic rows or the static
    scale as a [1] view (plans hand over a fp32 [1] tensor on the device already: no launch)."""
    q = torch.empty((m, k), dtype=torch.int8, device=device)
    if static_scale is not None:
        return q, static_scale.reshape(1).to(device=device, dtype=torch.float32)
    return q, torch.empty((m,), dtype=torch.float32, device=device)


class RowQuantizer:
    """Quantizes rows of length K (optional SmoothQuant divisor) for one layer: the launch
    configuration and the kernel's launcher are decided once (see triton_launch), so a plan's
    per-call cost is the allocations and one direct launch."""

    def __init__(self, k: int, smooth: torch.Tensor | None = None):
        if smooth is not None and smooth.numel() != k:
            raise ValueError(f"smooth has {smooth.numel()} entries, activations have K={k}")
        self.k = k
        self.smooth = smooth.contiguous() if smooth is not None else None
        one_tile, block_k, num_warps = row_launch_config(k)
        # The launch flags per (static, CUDA): built once, not per call.
        self.flags = {(static, cuda): dict(ONE_TILE=one_tile, BLOCK_K=block_k, num_warps=num_warps,
                                           HAS_SMOOTH=self.smooth is not None, STATIC=static,
                                           SCALE_BY_RECIPROCAL=cuda)
                      for static in (False, True) for cuda in (False, True)}
        self.launcher = triton_launch.Launcher(_quantize_rows_kernel, "quantize_rows")

    def __call__(self, x2d: torch.Tensor, static_scale: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        if x2d.dim() != 2 or x2d.stride(1) != 1:
            raise ValueError(f"quantize_rows wants a 2-D tensor with contiguous rows, got {tuple(x2d.shape)} "
                             f"strides {x2d.stride()}")
        if x2d.shape[1] != self.k:
            raise ValueError(f"this quantizer is for rows of K={self.k}"
                             f"{' (its smooth has that many entries)' if self.smooth is not None else ''}, "
                             f"activations have K={x2d.shape[1]}")
        if static_scale is not None:
            static_scale = static_scale.reshape(1).to(device=x2d.device, dtype=torch.float32)
        return self.run(x2d, static_scale)

    def run(self, x2d: torch.Tensor, static_scale: torch.Tensor | None, scratch: bool = False
            ) -> tuple[torch.Tensor, torch.Tensor]:
        """``__call__`` without its checks and conversions, for a plan whose inputs are right by
        construction (x2d [M, K] with unit column stride; static_scale None or fp32 [1] on x2d's device):
        an eager step calls this once per INT8 layer, and each check is host time (bench/launch_cost.py).
        ``scratch``: the codes and scales may come from the stream's scratch (scratch.py), for a caller
        whose GEMM, launched next on this stream, is their only reader."""
        m, k = x2d.shape
        device = x2d.device
        static = static_scale is not None
        shared = scratch_buffers.codes_and_scales(m, k, device) if scratch else None
        if shared is not None:
            q, scales = shared[0], static_scale if static else shared[1]
        else:
            q = torch.empty((m, k), dtype=torch.int8, device=device)
            scales = static_scale if static else torch.empty((m,), dtype=torch.float32, device=device)
        if m == 0:
            return q, scales
        smooth_arg = self.smooth if self.smooth is not None else x2d
        stride = x2d.stride(0)
        cuda = device.type == "cuda"
        key = self._key(static, cuda, x2d.dtype, x2d.data_ptr() % 16 == 0, static and scales.data_ptr() % 16 == 0,
                        stride)
        self.launcher(key, lambda meta: (m,), lambda meta: (x2d, smooth_arg, scales, q, scales, k, stride),
                      self.flags[static, cuda])
        return q, scales

    @staticmethod
    def _key(static: bool, cuda: bool, dtype, x_aligned: bool, static_aligned: bool, stride: int) -> tuple:
        # What Triton specializes on that can change between calls (triton_launch). q and the dynamic
        # scales are fresh allocations or the scratch's (offset 0): 512-byte aligned blocks.
        return (static, cuda, dtype, x_aligned, static_aligned, stride == 1, stride % 16 == 0)

    def bound(self, dtype, x_aligned: bool, static: bool, static_aligned: bool):
        """``launch(rows, stream, x, q, scales)`` for contiguous rows of ``dtype`` on CUDA with these alignment
        facts, through the C launcher Triton's first call at that key left (``Launcher.learned``); None where
        there is none. The arguments are exactly ``run``'s, in the same order (the caller checks the device)."""
        record = self.launcher.learned(self._key(static, True, dtype, x_aligned, static and static_aligned, self.k))
        if record is None:
            return None
        c_launch, smooth, k = record.c_launch, self.smooth, self.k

        def launch(m, stream, x, q, scales):
            c_launch(m, 1, 1, stream, (x, x if smooth is None else smooth, scales, q, scales, k, k))
        return launch


def quantize_rows(x2d: torch.Tensor, smooth: torch.Tensor | None = None,
                  static_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """[M, K] float -> (int8 [M, K], fp32 scales [M] dynamic or [1] static). Same numbers as
    ``torch_ref.quantize_rows`` (whose scales are shaped [M, 1] / [1, 1]). One-shot; plans keep a
    ``RowQuantizer``."""
    if x2d.dim() != 2 or x2d.stride(1) != 1:
        raise ValueError(f"quantize_rows wants a 2-D tensor with contiguous rows, got {tuple(x2d.shape)} "
                         f"strides {x2d.stride()}")
    with registry.one_call_plans():     # made for this call: no direct launch to learn (triton_launch.Launcher)
        quantizer = RowQuantizer(x2d.shape[1], smooth)
    return quantizer(x2d, static_scale)


# ---- per-sample NCHW -> NHWC --------------------------------------------------------------------

@triton.jit
def _sample_absmax_kernel(x_ptr, smooth_ptr, partial_ptr, C, HW, num_chunks,
                          HAS_SMOOTH: tl.constexpr, BLOCK: tl.constexpr):
    # Grid (N, num_chunks): each program reduces one contiguous chunk of one sample. Partial maxima
    # go to [N, num_chunks] (no float atomics: deterministic, and the interpreter runs it too).
    n = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < C * HW
    v = tl.load(x_ptr + n * C * HW + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_SMOOTH:
        v = tl.div_rn(v, tl.load(smooth_ptr + offs // HW, mask=mask, other=1.0).to(tl.float32))
    tl.store(partial_ptr + n * num_chunks + chunk, tl.max(tl.abs(v), axis=0))


@triton.jit
def _quantize_nchw_to_nhwc_kernel(x_ptr, smooth_ptr, partial_ptr, static_ptr, q_ptr, scale_ptr,
                                  C, HW, num_chunks,
                                  HAS_SMOOTH: tl.constexpr, STATIC: tl.constexpr,
                                  SCALE_BY_RECIPROCAL: tl.constexpr, BLOCK_CHUNKS: tl.constexpr, BLOCK_C: tl.constexpr,
                                  BLOCK_HW: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    pid_hw = tl.program_id(1)
    pid_c = tl.program_id(2)
    if STATIC:
        scale = tl.load(static_ptr).to(tl.float32)
    else:
        chunks = tl.arange(0, BLOCK_CHUNKS)
        part = tl.load(partial_ptr + n * num_chunks + chunks, mask=chunks < num_chunks, other=0.0)
        scale = scale_from_absmax(tl.max(part, axis=0), SCALE_BY_RECIPROCAL)
        if (pid_hw == 0) & (pid_c == 0):
            tl.store(scale_ptr + n, scale)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_hw = pid_hw * BLOCK_HW + tl.arange(0, BLOCK_HW)
    mask = (offs_c[:, None] < C) & (offs_hw[None, :] < HW)
    # Read along HW (contiguous in NCHW), write along C (contiguous in NHWC).
    v = tl.load(x_ptr + n * C * HW + offs_c[:, None] * HW + offs_hw[None, :], mask=mask, other=0.0)
    v = v.to(tl.float32)
    if HAS_SMOOTH:
        v = tl.div_rn(v, tl.load(smooth_ptr + offs_c, mask=offs_c < C, other=1.0).to(tl.float32)[:, None])
    q = round_to_int8(tl.div_rn(v, scale))
    tl.store(q_ptr + n * C * HW + offs_hw[None, :] * C + offs_c[:, None], q, mask=mask)


class SampleQuantizer:
    """Per-sample quantization of NCHW activations with C channels to NHWC int8 for one conv layer,
    its two kernels' launchers prepared once (triton_launch)."""

    def __init__(self, c: int, smooth: torch.Tensor | None = None):
        if smooth is not None and smooth.numel() != c:
            raise ValueError(f"smooth has {smooth.numel()} entries, activations have C={c}")
        self.c = c
        self.smooth = smooth.contiguous() if smooth is not None else None
        self.absmax = triton_launch.Launcher(_sample_absmax_kernel, "sample_absmax")
        self.quantize = triton_launch.Launcher(_quantize_nchw_to_nhwc_kernel, "quantize_nchw_to_nhwc")

    def __call__(self, x: torch.Tensor, static_scale: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dim() != 4:
            raise ValueError(f"quantize_per_sample_nhwc wants NCHW, got shape {tuple(x.shape)}")
        x = x.contiguous()
        n, c, h, w = x.shape
        if c != self.c:
            raise ValueError(f"this quantizer is for C={self.c} channels"
                             f"{' (its smooth has that many entries)' if self.smooth is not None else ''}, "
                             f"activations have C={c}")
        hw = h * w
        device = x.device
        q = torch.empty((n, h, w, c), dtype=torch.int8, device=device)
        smooth_arg = self.smooth if self.smooth is not None else x
        static = static_scale is not None
        if static:
            scales = static_scale.reshape(1).to(device=device, dtype=torch.float32).expand(n).contiguous()
            partial = scales
        else:
            scales = torch.empty((n,), dtype=torch.float32, device=device)
            partial = torch.empty((n, self._chunks(c * hw)), dtype=torch.float32, device=device)
        absmax_key, quantize_key, num_chunks = self._keys(x.dtype, x.data_ptr() % 16 == 0, static,
                                                          partial.data_ptr() % 16 == 0, hw, c * hw)
        if not static:
            self.absmax(absmax_key, lambda meta: (n, num_chunks),
                        lambda meta: (x, smooth_arg, partial, c, hw, num_chunks), self._absmax_flags)
        grid = (n, triton_support.cdiv(hw, self.BLOCK_HW), triton_support.cdiv(c, self.BLOCK_C))
        self.quantize(quantize_key,
                      lambda meta: grid, lambda meta: (x, smooth_arg, partial, scales, q, scales, c, hw, num_chunks),
                      self._quantize_flags(static, x.is_cuda, num_chunks))
        return q, scales

    BLOCK, BLOCK_C, BLOCK_HW = 8192, 64, 64     # the absmax pass's chunk; the quantize pass's tile

    @property
    def _absmax_flags(self) -> dict:
        return dict(HAS_SMOOTH=self.smooth is not None, BLOCK=self.BLOCK, num_warps=8)

    def _chunks(self, per_sample: int) -> int:
        return triton_support.cdiv(per_sample, self.BLOCK)

    def _quantize_flags(self, static: bool, cuda: bool, num_chunks: int) -> dict:
        return dict(HAS_SMOOTH=self.smooth is not None, STATIC=static, SCALE_BY_RECIPROCAL=cuda,
                    BLOCK_CHUNKS=triton_support.next_power_of_2(num_chunks), BLOCK_C=self.BLOCK_C,
                    BLOCK_HW=self.BLOCK_HW, num_warps=4)

    def _keys(self, dtype, x_aligned: bool, static: bool, scales_aligned: bool, hw: int, per_sample: int) -> tuple:
        """The two launches' keys (what Triton specializes on, triton_launch) and the chunks per sample. q is a
        fresh allocation (16-byte aligned); a static scale is both the partial and the scales tensor."""
        num_chunks = 1 if static else self._chunks(per_sample)
        facts = (x_aligned, scales_aligned) + triton_launch.facts(hw, num_chunks)
        return ((dtype,) + facts, (dtype, static, triton_support.next_power_of_2(num_chunks)) + facts
                + (scales_aligned, True), num_chunks)

    def bound(self, shape: tuple, dtype, x_aligned: bool, static: bool, static_aligned: bool):
        """``launch(stream, x, static_scale) -> (q, scales)`` for contiguous NCHW CUDA inputs of ``shape`` and
        ``dtype`` with these alignment facts (a static scale: fp32 on x's device, [1]), through the C launchers
        Triton's first calls at those keys left; None where there are none. The caller checks the device."""
        n, c, h, w = shape
        hw = h * w
        # A static scale is expanded to [N]: the same tensor at N=1, a fresh (aligned) one above.
        scales_aligned = (static_aligned or n > 1) if static else True
        absmax_key, quantize_key, num_chunks = self._keys(dtype, x_aligned, static, scales_aligned, hw, c * hw)
        absmax = None if static else self.absmax.learned(absmax_key)
        quantize = self.quantize.learned(quantize_key)
        if quantize is None or (absmax is None and not static):
            return None
        c_quantize, c_absmax = quantize.c_launch, None if static else absmax.c_launch
        smooth = self.smooth
        grid = (n, triton_support.cdiv(hw, self.BLOCK_HW), triton_support.cdiv(c, self.BLOCK_C))

        def launch(stream, x, static_scale):
            device = x.device
            q = torch.empty((n, h, w, c), dtype=torch.int8, device=device)
            smooth_arg = smooth if smooth is not None else x
            if static:
                scales = partial = static_scale.expand(n).contiguous()
            else:
                scales = torch.empty((n,), dtype=torch.float32, device=device)
                partial = torch.empty((n, num_chunks), dtype=torch.float32, device=device)
                c_absmax(n, num_chunks, 1, stream, (x, smooth_arg, partial, c, hw, num_chunks))
            c_quantize(grid[0], grid[1], grid[2], stream,
                       (x, smooth_arg, partial, scales, q, scales, c, hw, num_chunks))
            return q, scales
        return launch


def quantize_per_sample_nhwc(x: torch.Tensor, smooth: torch.Tensor | None = None,
                             static_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """NCHW float -> (int8 [N, H, W, C] contiguous, fp32 scales [N]). Same numbers as
    ``torch_ref.quantize_per_sample`` (there the int8 tensor stays NCHW). One-shot; conv plans keep
    a ``SampleQuantizer``."""
    if x.dim() != 4:
        raise ValueError(f"quantize_per_sample_nhwc wants NCHW, got shape {tuple(x.shape)}")
    with registry.one_call_plans():     # made for this call: no direct launch to learn (triton_launch.Launcher)
        quantizer = SampleQuantizer(x.shape[1], smooth)
    return quantizer(x, static_scale)


# ---- A GELU (and Flux's cat) applied inside the quantization of the next layer's input ---------
# Transformer MLPs compute fc2(gelu_tanh(h)); Flux's single block computes
# linear2(cat(attn, gelu_tanh(mlp))) with mlp a column slice of linear1's output. Quantizing that
# input per token needs the whole row's absmax, across both halves, so it cannot move into the
# producing GEMM's epilogue; instead this one kernel reads the optional head (attn) and the
# pre-activation in place (strided rows), applies the GELU in fp32, and writes the int8 row and its
# scale: no float cat, no float GELU output, no separate quantization pass. octet/deferred.py is what
# routes a model's GELU here.

@triton.jit
def _cat_gelu_tile(a_row, g_row, smooth_ptr, k0, offs, K1, K2, HAS_SMOOTH: tl.constexpr):
    # Columns [0, K1) come from the head, [K1, K1 + K2) are GELU(pre); one tile may straddle both.
    cols = k0 + offs
    in_a = cols < K1
    in_g = (cols >= K1) & (cols < K1 + K2)
    va = tl.load(a_row + cols, mask=in_a, other=0.0).to(tl.float32)
    vg = tl.load(g_row + (cols - K1), mask=in_g, other=0.0).to(tl.float32)
    v = tl.where(in_a, va, gelu_tanh(vg))
    if HAS_SMOOTH:
        v = tl.div_rn(v, tl.load(smooth_ptr + cols, mask=in_a | in_g, other=1.0).to(tl.float32))
    return v, in_a | in_g


@triton.jit
def _quantize_cat_gelu_kernel(a_ptr, g_ptr, smooth_ptr, static_ptr, q_ptr, scale_ptr, K1, K2, stride_am, stride_gm,
                              HAS_SMOOTH: tl.constexpr, STATIC: tl.constexpr, SCALE_BY_RECIPROCAL: tl.constexpr,
                              BLOCK_K: tl.constexpr, ONE_TILE: tl.constexpr, RECIPROCAL_CODES: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    a_row = a_ptr + row * stride_am
    g_row = g_ptr + row * stride_gm
    q_row = q_ptr + row * (K1 + K2)
    offs = tl.arange(0, BLOCK_K)
    if ONE_TILE:   # the whole row in registers: one read, the GELU computed once
        v, mask = _cat_gelu_tile(a_row, g_row, smooth_ptr, 0, offs, K1, K2, HAS_SMOOTH)
        # RECIPROCAL_CODES (the default): dynamic codes by the scale's reciprocal. The division and the clamp are
        # 30 % of this kernel's instructions (ptxas sm_90, arguments 16-byte aligned as launched: 788 -> 548 for a
        # thread's 16 elements), and at Flux's single blocks its 116M warp instructions take ~80 % of its 146.8 us
        # on an H100 at the card's issue rate (92.2 us so, 8 warps). This quantizer's GELU already differs from
        # torch's in the last bit.
        _quantize_row_in_registers(v, mask, q_row + offs, static_ptr, scale_ptr, row, STATIC, SCALE_BY_RECIPROCAL,
                                   RECIPROCAL_CODES)
    else:
        if STATIC:
            scale = tl.load(static_ptr).to(tl.float32)
        else:
            absmax = tl.zeros([BLOCK_K], dtype=tl.float32)
            for k0 in range(0, K1 + K2, BLOCK_K):
                v, _ = _cat_gelu_tile(a_row, g_row, smooth_ptr, k0, offs, K1, K2, HAS_SMOOTH)
                absmax = tl.maximum(absmax, tl.abs(v))
            scale = scale_from_absmax(tl.max(absmax, axis=0), SCALE_BY_RECIPROCAL)
            tl.store(scale_ptr + row, scale)
        for k0 in range(0, K1 + K2, BLOCK_K):
            v, mask = _cat_gelu_tile(a_row, g_row, smooth_ptr, k0, offs, K1, K2, HAS_SMOOTH)
            tl.store(q_row + k0 + offs, round_to_int8(tl.div_rn(v, scale)), mask=mask)


def _rows(t: torch.Tensor, what: str) -> torch.Tensor:
    """[..., K] -> [M, K] with unit column stride, a view where the strides allow it (a column slice
    of a bigger output stays a strided view: the kernel reads it in place)."""
    t2 = t.reshape(-1, t.shape[-1])
    if t2.shape[1] > 1 and t2.stride(1) != 1:
        raise ValueError(f"{what} needs contiguous rows, got strides {t.stride()}")
    return t2


def gelu_row_launch_config(k: int) -> tuple[int, int]:
    """(tile width, warps) of the GELU row quantizer for rows of k. Rows of 8193..16384: the whole row in
    one tile of 8 warps (the GELU computed once): at Flux's single-block 15360 on an H200 137.2 us (16 warps 138.7)
    against 173.7-266.4 us for every two-sweep (tile, warps) (bench/deferred_kernels.py --sweep, 2026-12-02); on an
    H100 with the codes by the division 32 warps ran 145.9 against 16 warps' 152.7, and 520.4 against 548.7 at Wan's
    14,040 x 8960 (bench/quant_rows_sweep.py, 2026-12-06); with the codes by the scale's reciprocal (the default since)
    8 warps ran 92.2 us at Flux's against 93.6 at 16 and 96.6 at 32 (4 warps 120.3), and 260.0 at Wan's against
    269.6 and 278.4 (H100, 2026-12-06 16:53 UTC, one call).
    Shorter rows: two sweeps over tiles of about a quarter of the row, as ``row_launch_config`` measured
    for plain rows (bench/quant_rows_sweep.py times this quantizer's whole-row tiles against it)."""
    whole = triton_support.next_power_of_2(k)
    if 8192 < whole <= 16384:
        return whole, 8
    block_k = min(2048, max(256, whole // 4))
    return block_k, 4 if block_k <= 1024 else 8


class GeluRowQuantizer:
    """Per-token (or static) INT8 of cat(head, gelu_tanh(pre)) along the last dim, or of
    gelu_tanh(pre) alone when there is no head, for rows of K1 + K2 columns: prepared once per layer
    like ``RowQuantizer`` (launch config and direct launcher). Reference:
    torch_ref.cat_gelu_quantize_rows (GELU in fp32; the kernel's fp32 GELU can differ from torch's in
    the last bit, moving a code by one at a rounding tie)."""

    def __init__(self, k1: int, k2: int, smooth: torch.Tensor | None = None, config: tuple[int, int] | None = None,
                 reciprocal_codes: bool = True):
        if smooth is not None and smooth.numel() != k1 + k2:
            raise ValueError(f"smooth has {smooth.numel()} entries, the concatenated row has K={k1 + k2}")
        self.k1, self.k2 = k1, k2
        self.smooth = smooth.reshape(-1).contiguous() if smooth is not None else None
        # (tile width, warps); ``config`` overrides it for bench/kernels.py-style sweeps. ``reciprocal_codes``: a
        # whole-row tile's dynamic codes by the scale's reciprocal (see the kernel: at Flux's 4608 x 15,360 on an
        # H100 92.2 us at 8 warps against the division's 146.0 at 32, bench/quant_rows_sweep.py 2026-12-06); False:
        # the division.
        block_k, num_warps = config or gelu_row_launch_config(k1 + k2)
        self.flags = {(static, cuda): dict(HAS_SMOOTH=self.smooth is not None, STATIC=static, SCALE_BY_RECIPROCAL=cuda,
                                           BLOCK_K=block_k, ONE_TILE=block_k >= k1 + k2, num_warps=num_warps,
                                           RECIPROCAL_CODES=reciprocal_codes)
                      for static in (False, True) for cuda in (False, True)}
        self.launcher = triton_launch.Launcher(_quantize_cat_gelu_kernel, "quantize_cat_gelu")

    def __call__(self, head: torch.Tensor | None, pre: torch.Tensor, static_scale: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        g = _rows(pre, "the GELU input")
        m = g.shape[0]
        a = _rows(head, "the concatenated head") if head is not None else g
        k1 = a.shape[1] if head is not None else 0
        if a.shape[0] != m or k1 != self.k1 or g.shape[1] != self.k2:
            raise ValueError(f"this quantizer is for rows of {self.k1} head + {self.k2} GELU columns, got head "
                             f"{None if head is None else tuple(head.shape)} and GELU input {tuple(pre.shape)}")
        q, scales = _codes_and_scales(m, self.k1 + self.k2, g.device, static_scale)
        static = static_scale is not None
        if m == 0:
            return q, scales
        smooth_arg = self.smooth if self.smooth is not None else scales
        sa, sg = a.stride(0) if head is not None else 0, g.stride(0)
        cuda = g.is_cuda
        key = (static, cuda, a.dtype, g.dtype, a.data_ptr() % 16 == 0, g.data_ptr() % 16 == 0,
               static and scales.data_ptr() % 16 == 0, sa == 1, sa % 16 == 0, sg == 1, sg % 16 == 0)
        self.launcher(key, lambda meta: (m,),
                      lambda meta: (a, g, smooth_arg, scales, q, scales, self.k1, self.k2, sa, sg),
                      self.flags[static, cuda])
        return q, scales


def quantize_rows_cat_gelu(attn: torch.Tensor | None, mlp: torch.Tensor, smooth: torch.Tensor | None = None,
                           static_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """INT8 of cat(attn, gelu_tanh(mlp)) (or gelu_tanh(mlp) with attn None) along the last dim without
    materialising it: attn [M, K1], mlp [M, K2] (pre-activation; rows may be strided, e.g. a column
    slice of linear1's output) -> (int8 [M, K1 + K2], fp32 scales [M], or [1] static). One-shot;
    plans keep a ``GeluRowQuantizer``."""
    if mlp.dim() != 2 or (attn is not None and (attn.dim() != 2 or attn.shape[0] != mlp.shape[0])):
        raise ValueError(f"attn [M, K1] and mlp [M, K2] must share M, got "
                         f"{None if attn is None else tuple(attn.shape)} and {tuple(mlp.shape)}")
    with registry.one_call_plans():     # made for this call: no direct launch to learn (triton_launch.Launcher)
        quantizer = GeluRowQuantizer(0 if attn is None else attn.shape[1], mlp.shape[1], smooth)
    return quantizer(attn, mlp, static_scale)


# ---- A LayerNorm (no affine) and its modulation applied inside the quantization of the next layer ---
# Flux's and SD3's blocks feed their attention qkv and MLP fc1 with addcmul(shift, layer_norm(x), 1 + scale):
# a LayerNorm pass and a modulation pass, each reading and writing the activation in float, before the
# quantization pass reads it again. This kernel normalises BLOCK_M rows in fp32, modulates each with its batch
# entry of mult/shift (triton_layernorm.norm_modulate_rows, the float kernel's math), and writes the int8 rows and
# their scales (octet/deferred.py routes it here).

@triton.jit
def _quantize_norm_rows_kernel(x_ptr, mult_ptr, shift_ptr, smooth_ptr, static_ptr, q_ptr, scale_ptr, M, K, L,
                               stride_xm, stride_mb, stride_sb, eps,
                               HAS_MULT: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_SMOOTH: tl.constexpr,
                               STATIC: tl.constexpr, SCALE_BY_RECIPROCAL: tl.constexpr, BLOCK_M: tl.constexpr,
                               BLOCK_K: tl.constexpr, RECIPROCAL_CODES: tl.constexpr):
    y, rows, offs, mask_m, mask_k = norm_modulate_rows(x_ptr, mult_ptr, shift_ptr, M, K, L, stride_xm, stride_mb,
                                                       stride_sb, eps, HAS_MULT, HAS_SHIFT, BLOCK_M, BLOCK_K)
    if HAS_SMOOTH:
        y = tl.div_rn(y, tl.load(smooth_ptr + offs, mask=mask_k, other=1.0).to(tl.float32)[None, :])
    # Each row's scale (the static one, or from its absmax, stored), then its codes, as _quantize_row_in_registers;
    # RECIPROCAL_CODES (the default): dynamic codes by the scale's reciprocal (triton_math.codes_by_reciprocal), as
    # the GELU quantizer's (ptxas sm_90 at Flux's 3072-wide rows, 4 warps: 1252 -> 757 instructions a thread,
    # bench/sass_count.py; on an H100 20.4 us against the division's 36.0 at Flux's 4608 x 3072, 32.4 against 54.2 at
    # Wan's 14,040 x 1536: bench/quant_rows_sweep.py, 2026-12-06).
    if STATIC:
        codes = round_to_int8(tl.div_rn(y, tl.load(static_ptr).to(tl.float32)))
    else:
        scale = scale_from_absmax(tl.max(tl.abs(y), axis=1), SCALE_BY_RECIPROCAL)
        tl.store(scale_ptr + rows, scale, mask=mask_m)
        if RECIPROCAL_CODES:
            codes = codes_by_reciprocal(y, scale[:, None])
        else:
            codes = round_to_int8(tl.div_rn(y, scale[:, None]))
    tl.store(q_ptr + rows[:, None] * K + offs[None, :], codes, mask=mask_m[:, None] & mask_k[None, :])


def norm_launch_config(k: int) -> tuple[int, int]:
    """(rows per program, warps) of the norm quantizer: one row, 4 warps up to 4096 wide, 16 beyond. At Wan's
    14,040 x 1536 on an H100 (bench/deferred_kernels.py --only wan --sweep, 2026-12-06) 4 warps ran 54.9 us against
    8 warps' 65.1 (103.7 vs 126.4 at batch 2); at Flux's 4608 x 3072 (--only flux_norm --sweep, same day) 38.5
    against 40.5 (4096 rows: 33.1 vs 35.3; 512 rows: 7.0 vs 6.8), 16 warps 46.0; several rows per program were
    slower at both (48.9-189 us). Issuing the modulation's loads before the reductions (to overlap the two memory
    round trips) ran slower too: 48.1 us at 4608 x 3072. Rows wider than 4096 are not swept."""
    block_k = triton_support.next_power_of_2(k)
    return 1, 4 if block_k <= 4096 else 16


class NormRowQuantizer:
    """INT8 of addcmul(shift, layer_norm(x), mult) (or with mult / shift absent) per token or static, for rows
    of K: prepared once per layer (launch config, direct launcher). Reference: torch_ref.norm_quantize_rows
    (fp32 throughout; ComfyUI rounds the LayerNorm and the modulation to the activation dtype)."""

    def __init__(self, k: int, smooth: torch.Tensor | None = None, config: tuple | None = None,
                 reciprocal_codes: bool = True):
        if smooth is not None and smooth.numel() != k:
            raise ValueError(f"smooth has {smooth.numel()} entries, activations have K={k}")
        self.k = k
        self.smooth = smooth.reshape(-1).contiguous() if smooth is not None else None
        self.block_k = triton_support.next_power_of_2(k)
        self.block_m, self.num_warps = config or norm_launch_config(k)
        # The launch flags of every (static, cuda, mult given, shift given), built here rather than per call: a
        # learned launch does not read them, and the dict cost host time on every eager step's qkv / fc1 input.
        self.flags = {(static, cuda, has_mult, has_shift): dict(
            HAS_MULT=has_mult, HAS_SHIFT=has_shift, HAS_SMOOTH=self.smooth is not None, STATIC=static,
            SCALE_BY_RECIPROCAL=cuda, BLOCK_M=self.block_m, BLOCK_K=self.block_k,
            RECIPROCAL_CODES=reciprocal_codes, num_warps=self.num_warps)
            for static in (False, True) for cuda in (False, True) for has_mult in (False, True)
            for has_shift in (False, True)}
        self.launcher = triton_launch.Launcher(_quantize_norm_rows_kernel, "quantize_norm_rows")

    @staticmethod
    def takes(x: torch.Tensor, mult: torch.Tensor | None, shift: torch.Tensor | None) -> bool:
        """Whether this kernel can apply that normalisation + modulation (else the caller computes it in float)."""
        return triton_layernorm.NormModulate.takes(x, mult, shift)

    def __call__(self, x: torch.Tensor, eps: float, mult: torch.Tensor | None, shift: torch.Tensor | None,
                 static_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        mult_rows, shift_rows = triton_layernorm.batch_rows(mult, x), triton_layernorm.batch_rows(shift, x)
        if x.shape[-1] != self.k or not triton_layernorm.fits(x) or mult_rows is None or shift_rows is None:
            raise ValueError(f"this quantizer normalises rows of K={self.k} modulated per batch entry, got x "
                             f"{tuple(x.shape)}, mult {None if mult is None else tuple(mult.shape)}, shift "
                             f"{None if shift is None else tuple(shift.shape)}")
        (mult, smb), (shift, ssb) = mult_rows, shift_rows
        rows = _rows(x, "the normalised input")
        m = rows.shape[0]
        tokens = x.shape[1] if x.dim() == 3 else m
        q, scales = _codes_and_scales(m, self.k, x.device, static_scale)
        static = static_scale is not None
        if m == 0:
            return q, scales
        sx = rows.stride(0)
        smooth_arg = self.smooth if self.smooth is not None else scales
        cuda = x.is_cuda
        key = (static, cuda, x.dtype, mult is not None, shift is not None) + triton_launch.facts(
            rows, q, scales, sx, tokens, m, smb, ssb, *(t for t in (mult, shift) if t is not None))
        flags = self.flags[static, cuda, mult is not None, shift is not None]
        grid = (triton_support.cdiv(m, self.block_m),)
        self.launcher(key, lambda meta: grid,
                      lambda meta: (rows, mult if mult is not None else rows, shift if shift is not None else rows,
                                    smooth_arg, scales, q, scales, m, self.k, tokens, sx, smb, ssb, float(eps)),
                      flags)
        return q, scales
