"""Weight-only INT8 GEMM (W8A16) that reads the int8 weight as stored and never makes a float copy.

y[m, n] = (sum_k x[m, k] * q[n, k]) * w_scale[n] (+ bias[n]), x in bf16/fp16/fp32, q int8 [N, K].

Each K step loads an int8 weight tile, converts it to the activation dtype in registers (exact:
|q| <= 127) and feeds a bf16/fp16 tensor-core dot with fp32 accumulation; the per-row scale and
the bias are applied once, in the epilogue. Two operand orders, chosen by the autotuner:

  * ``SWAP_AB=True`` computes the transposed tile, acc[n, m] = q[n, :] . x[m, :]. On Hopper a
    wgmma takes its A operand from registers but its B operand only from shared memory, so the
    converted weight goes in as A straight from registers, and the activation tile (already in
    the dot's dtype) is B, loaded by TMA/cp.async into shared memory. Small M becomes the
    wgmma's N dimension (8..256), which is why this order also suits decode-like small M.
  * ``SWAP_AB=False`` is the textbook order: the converted weight must be written back to shared
    memory to be a B operand. Kept as a candidate since it is the better shape for some tiles.

Operands come through TMA descriptors on Hopper when the row pitches are 16-byte aligned (int8
weight: K % 16 == 0; 16-bit activations: K % 8 == 0), otherwise through masked pointer loads.
The configs are keyed on (M bucket, N, K): small M is bound by reading the weight (int8 reads half
the bytes of bf16), large M by the tensor cores (bf16 rate, like cuBLAS: there the conversion
must hide under the dots).

``w8a16_gemm(..., config=...)`` launches one given configuration without the autotuner: for tests
(the interpreter runs one config) and for a caller that plans its launch once per signature.
"""
from __future__ import annotations

import weakref

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ..registry import m_bucket
from . import scratch as scratch_buffers, triton_launch, triton_support
from .triton_gemm import _grouped_tile, check_float_gemm  # the one tile order and argument check



def _cfg(bm, bn, bk, stages, warps, swap, group_m=8):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m, "SWAP_AB": swap},
                         num_stages=stages, num_warps=warps, pre_hook=_set_descriptor_blocks)


_set_descriptor_blocks = triton_support.tma_box_hook("x", "w")


def configs() -> list:
    """Candidates: small-M tiles that stream long weight strips (many stages of wide K steps, M as
    the narrow dot dimension), and large-M tiles sized like a bf16 Hopper GEMM (128x256 / 256x128
    output, K=64 steps of 16-bit data = one 128-byte swizzled row, 3-4 stages in 228 KB of smem)."""
    if triton_support.interpreting():
        return [_cfg(16, 32, 32, 1, 4, True, group_m=2)]
    small = [
        _cfg(16, 64, 128, 5, 4, True), _cfg(16, 64, 256, 4, 4, True), _cfg(16, 128, 128, 4, 4, True),
        _cfg(32, 64, 128, 5, 4, True), _cfg(32, 128, 128, 4, 4, True), _cfg(64, 128, 128, 4, 4, True),
        _cfg(16, 32, 256, 4, 4, False), _cfg(16, 64, 128, 4, 4, False), _cfg(32, 64, 128, 4, 4, False),
    ]
    large = [
        _cfg(128, 256, 64, 3, 8, True), _cfg(256, 128, 64, 3, 8, True), _cfg(128, 128, 64, 4, 8, True),
        _cfg(128, 128, 64, 4, 4, True), _cfg(64, 256, 64, 4, 8, True),
        _cfg(128, 256, 64, 3, 8, False), _cfg(256, 128, 64, 3, 8, False), _cfg(128, 128, 64, 4, 4, False),
        _cfg(128, 128, 64, 4, 8, False), _cfg(128, 256, 64, 4, 8, False), _cfg(128, 128, 32, 5, 4, False),
    ]
    return small + large


def _prune(configs_, named_args, **kwargs):
    """Small M keeps the short tiles (a 128-row tile at M=16 wastes 7/8 of each dot), large M the
    large ones; at least one config always survives."""
    m = named_args["M"]
    cap = max(16, triton_support.next_power_of_2(m))
    kept = [c for c in configs_ if c.kwargs["BLOCK_M"] <= cap and (m <= 256 or c.kwargs["BLOCK_M"] >= 64)]
    return triton_support.survivors(configs_, kept)






@triton.jit
def _w8a16_kernel(x, w, c_ptr, w_scale_ptr, bias_ptr, M, N, K, M_BUCKET, stride_xm, stride_wn, stride_cm,
                  HAS_BIAS: tl.constexpr, USE_TMA: tl.constexpr, DOT_IN_FP32: tl.constexpr,
                  DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, SWAP_AB: tl.constexpr):
    pid_m, pid_n = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if not USE_TMA:
        # Rows past M/N wrap (modulo) instead of being masked: their garbage is dropped by the
        # masked store, and the loads stay unmasked on those axes.
        x_ptrs = x + (offs_m % M)[:, None] * stride_xm + offs_k[None, :]
        w_ptrs = w + (offs_n % N)[:, None] * stride_wn + offs_k[None, :]
    for k0 in range(0, K, BLOCK_K):
        if USE_TMA:
            x_tile = x.load([pid_m * BLOCK_M, k0])          # [BM, BK], out of range -> 0
            w_tile = w.load([pid_n * BLOCK_N, k0])          # [BN, BK] int8
        else:
            x_tile = tl.load(x_ptrs, mask=offs_k[None, :] < K - k0, other=0.0)
            w_tile = tl.load(w_ptrs, mask=offs_k[None, :] < K - k0, other=0)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        if DOT_IN_FP32:
            # The CPU interpreter multiplies bf16 tiles wrongly (numpy has no bf16); bf16 x int8
            # products are exact in fp32, so upcasting computes the same sums.
            x_tile = x_tile.to(tl.float32)
            w_tile = w_tile.to(tl.float32)
        else:
            w_tile = w_tile.to(x_tile.dtype)                # exact: |q| <= 127
        if SWAP_AB:
            acc = tl.dot(w_tile, tl.trans(x_tile), acc, input_precision=DOT_PRECISION)
        else:
            acc = tl.dot(x_tile, tl.trans(w_tile), acc, input_precision=DOT_PRECISION)
    if SWAP_AB:
        acc = tl.trans(acc)
    mask_m = offs_m < M
    mask_n = offs_n < N
    y = acc * tl.load(w_scale_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, y.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


_tuned_kernel = triton.autotune(configs=configs(), do_bench=triton_support.tuning_bench,
                                key=["M_BUCKET", "N", "K", "USE_TMA"],
                                prune_configs_by={"early_config_prune": _prune})(_w8a16_kernel)


# Below this M the operands come through pointer loads even on Hopper: measured on H200
# (bench/kernels.py --sections fused, 2026-12-01, runs 1 and 2) the TMA variant was up to 20 %
# slower at M=16 in a CUDA graph (Flux 3072->12288: 0.0149 ms vs 0.0126 with pointers), and
# building descriptors costs host time per call; at M=4096 the TMA variant was the faster one.
TMA_MIN_M = 256


def _use_tma(x2d: torch.Tensor, k: int) -> bool:
    # TMA wants 16-byte row pitches: int8 weight K % 16, 16-bit activations K % 8 (fp32 K % 4).
    # The interpreter emulates descriptors, so CI covers this path too (tests force each path).
    # A descriptor's base must be 16-byte aligned too: a view into a larger tensor (a slice of
    # Flux's fused qkv, say) may start anywhere, and then the operand comes through pointer loads.
    return (k % 16 == 0 and x2d.dtype != torch.float32 and x2d.shape[0] >= TMA_MIN_M
            and x2d.data_ptr() % 16 == 0 and (triton_support.is_hopper() or triton_support.interpreting()))


class W8A16Gemm:
    """The fused weight-only GEMM for one weight: checks, fp32 scales and the launcher prepared once
    (direct launches after the first call per key, see triton_launch)."""

    def __init__(self, qweight: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None):
        if qweight.dtype != torch.int8 or qweight.dim() != 2:
            raise ValueError(f"qweight must be int8 [N, K], got {qweight.dtype} {tuple(qweight.shape)}")
        self.n, self.k = qweight.shape
        self.qweight = qweight.contiguous()
        self.w_scale = w_scale.reshape(-1).to(device=qweight.device, dtype=torch.float32).contiguous()
        self.bias = bias
        self.launcher = triton_launch.Launcher(_tuned_kernel, "w8a16_gemm")
        self.weight_descs = triton_launch.WeightDescriptors(self.qweight)

    def __call__(self, x2d: torch.Tensor, config: dict | None = None, use_tma: bool | None = None) -> torch.Tensor:
        m, n, k = check_float_gemm(x2d, self.qweight, self.w_scale, self.bias)
        x2d = x2d if x2d.is_contiguous() else x2d.contiguous()
        out = torch.empty((m, n), dtype=x2d.dtype, device=x2d.device)
        if m == 0 or n == 0:
            return out
        bias = self.bias
        if k == 0:
            return out.copy_(bias.expand(m, n)) if bias is not None else out.zero_()
        w_scale = self.w_scale if self.w_scale.device == x2d.device else self.w_scale.to(x2d.device)
        tma = _use_tma(x2d, k) if use_tma is None else use_tma
        bias_arg = bias if bias is not None else w_scale
        flags = dict(HAS_BIAS=bias is not None, USE_TMA=tma, DOT_IN_FP32=triton_support.interpreting(),
                     DOT_PRECISION="ieee" if x2d.dtype == torch.float32 else "tf32")

        def build(meta):
            if tma:   # Triton's path: a descriptor its autotuner re-boxes; direct: triton_launch.Tma
                x_arg = TensorDescriptor(x2d, [m, k], [k, 1], [16, 16]) if meta is None \
                    else triton_launch.Tma(x2d, (m, k), (k, 1), (meta["BLOCK_M"], meta["BLOCK_K"]))
            else:
                x_arg = x2d
            weight = self.weight_descs.get(meta) if tma else self.qweight
            return (x_arg, weight, out, w_scale, bias_arg, m, n, k, m_bucket(m), k, k, n)

        def grid(meta):
            return (triton_support.cdiv(m, meta["BLOCK_M"]) * triton_support.cdiv(n, meta["BLOCK_N"]),)
        if config is not None:   # one given configuration, no autotuner (tests, benches)
            meta = dict(config)
            _w8a16_kernel[grid(meta)](*triton_launch.for_triton(build(meta)), **flags, **meta)
            return out
        # What Triton specializes on among the arguments that change between calls (triton_launch).
        key = (x2d.dtype, tma, m == 1, m % 16 == 0, m_bucket(m), x2d.data_ptr() % 16 == 0,
               out.data_ptr() % 16 == 0)
        self.launcher(key, grid, build, flags)
        return out


def w8a16_gemm(x2d: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
               config: dict | None = None, use_tma: bool | None = None) -> torch.Tensor:
    """float [M, K] x int8 [N, K]^T * w_scale[n] (+ bias) -> [M, N] in x's dtype, one launch. One-shot;
    plans keep a ``W8A16Linear``.

    ``config``: {"BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "SWAP_AB", "num_warps", "num_stages"}
    to launch without autotuning; ``use_tma`` forces the operand path (None: TMA where it can)."""
    check_float_gemm(x2d, qweight, w_scale, bias)
    return W8A16Gemm(qweight, w_scale, bias)(x2d, config, use_tma)


# ---- large M: dequantize in one pass, then cuBLAS ---------------------------------------------------
# At large M weight-only is compute-bound at the bf16 rate, and the fused kernel above (int8 ->
# bf16 conversion inside the main loop) measured 0.54-0.76x cuBLAS at M=4096 on H200 (graph; the
# autotuner picked the textbook operand order, 128x128x64 tiles: the swapped order did not win).
# Converting
# the weight once per call in one memory pass (int8 read, bf16 written: ~30 us for 12288x3072 at
# ~4 TB/s) and handing it to cuBLAS costs less there. The bf16 weight is transient (one layer's,
# returned to the caching allocator after the call), so the resident footprint stays int8.

@triton.jit
def _dequantize_kernel(q_ptr, s_ptr, out_ptr, K, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = offs < K
    q = tl.load(q_ptr + row * K + offs, mask=mask, other=0)
    # fp32 product rounded once to the output dtype: torch_ref.dequantize_weight bit for bit.
    w = q.to(tl.float32) * tl.load(s_ptr + row)
    tl.store(out_ptr + row * K + offs, w.to(out_ptr.dtype.element_ty), mask=mask)


def _dequantize_config(n: int, k: int):
    """The dequantize kernel's grid function and launch flags for an [N, K] weight (N, K > 0)."""
    block_k = min(4096, triton_support.next_power_of_2(k))
    grid = (n, triton_support.cdiv(k, block_k))
    return (lambda meta: grid), dict(BLOCK_K=block_k, num_warps=4 if block_k <= 2048 else 8)


def dequantize_weight(qweight: torch.Tensor, w_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int8 [N, K] * w_scale[n] -> dtype [N, K] in one launch (torch_ref.dequantize_weight's numbers).
    One-shot; W8A16Linear keeps its own launcher and configuration, which launch direct after its first call."""
    if qweight.dtype != torch.int8 or qweight.dim() != 2:
        raise ValueError(f"qweight must be int8 [N, K], got {qweight.dtype} {tuple(qweight.shape)}")
    n, k = qweight.shape
    if w_scale.numel() != n:
        raise ValueError(f"w_scale must have N={n} entries, got shape {tuple(w_scale.shape)}")
    qweight = qweight.contiguous()
    out = torch.empty((n, k), dtype=dtype, device=qweight.device)
    if n == 0 or k == 0:
        return out
    w_scale = w_scale.reshape(-1).to(device=qweight.device, dtype=torch.float32).contiguous()
    grid, flags = _dequantize_config(n, k)
    # Key: the output dtype; the weight, its scales and K are the layer's, the output a fresh allocation.
    triton_launch.Launcher(_dequantize_kernel, "dequantize_weight", learns=False)(    # one call: see Launcher
        (dtype,), grid, lambda meta: (qweight, w_scale, out, k), flags)
    return out


def prefers_dequant_cublas(m: int, n: int) -> bool:
    """Whether one-pass dequantize + cuBLAS beats the fused kernel at this shape.

    From the H200 crossover sweep (docs/BENCHMARKS.md, fused kernels; graph timing, ratio vs bf16,
    fused / dequant+cuBLAS): at M=16 the fused kernel wins everywhere (1.06-1.74x vs 0.42-0.68x);
    from M=1024 dequant+cuBLAS wins everywhere (0.79-0.96x vs 0.39-0.81x); in between the fused
    kernel keeps up only on wide layers (N=12288: 0.73-0.81x vs 0.43-0.72x) and loses on narrow
    ones, which have too few output tiles to fill the GPU (N=3072 at M=256: 0.31x vs 0.57x).
    Between M=64 and 1024 weight-only loses to bf16 either way (0.26-0.81x)."""
    return m >= 1024 or (m >= 128 and n <= 4096)


class W8A16Linear:
    """Weight-only INT8 linear for one weight: the fused kernel where reading the weight bounds the
    GEMM (small M), one-pass dequantization + cuBLAS where the bf16 tensor cores do (CUDA only; see
    prefers_dequant_cublas). Prepared once per plan."""

    def __init__(self, qweight: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None):
        self.fused = g = W8A16Gemm(qweight, w_scale, bias)
        self.dequant = triton_launch.Launcher(_dequantize_kernel, "dequantize_weight")
        self._bias_as: dict = {}
        # dequantize_weight's launch, fixed once: an eager step calls this per layer, and its checks and
        # conversions were host time on every call (bench/overhead.py, weight-only at M=4096).
        self._dequant_grid, self._dequant_flags = _dequantize_config(g.n, max(g.k, 1))
        self._bound = triton_launch.BoundCalls()   # (shape, dtype) -> call (_bind)

    def __call__(self, x2d: torch.Tensor) -> torch.Tensor:
        key = (x2d.shape, x2d.dtype)
        bound = self._bound.get(key)
        if bound is None:
            y = self._run(x2d)
            self._bind(key, x2d)
            return y
        return bound(x2d) if bound else self._run(x2d)

    def _dequantizes(self, x2d: torch.Tensor) -> bool:
        g = self.fused
        return x2d.is_cuda and x2d.dim() == 2 and x2d.shape[1] == g.k and g.n > 0 and g.k > 0 \
            and prefers_dequant_cublas(x2d.shape[0], g.n)

    def _bias(self, dtype: torch.dtype):
        bias = self._bias_as.get(dtype)
        if bias is None and self.fused.bias is not None:
            bias = self._bias_as[dtype] = self.fused.bias.to(dtype)
        return bias

    def _run(self, x2d: torch.Tensor) -> torch.Tensor:
        if not self._dequantizes(x2d):
            return self.fused(x2d)
        g, dtype = self.fused, x2d.dtype
        w = torch.empty((g.n, g.k), dtype=dtype, device=x2d.device)
        q, scale, k = g.qweight, g.w_scale, g.k   # on x2d's device: a plan's operands are
        # As dequantize_weight (same kernel, key and arguments), without its per-call checks.
        self.dequant((dtype,), self._dequant_grid, lambda meta: (q, scale, w, k), self._dequant_flags)
        return torch.nn.functional.linear(x2d, w, self._bias(dtype))

    def _bind(self, key, x2d: torch.Tensor) -> None:
        """After the first call at ``key`` on the dequantize + cuBLAS path (the launch is learned), the call with
        the dequantize kernel's C launcher, grid and arguments fixed, its float weight from the stream's scratch:
        one C launch and cuBLAS per call (H200, bench/overhead.py: 25-31 us of host time at SDXL's M=4096 shapes,
        against 29-32 with a fresh weight per call and 30-35 through ``_run``); the rest is cuBLAS's own host
        time. False elsewhere (the fused kernel's side, CPU, direct launches off): ``_run`` then."""
        if not self._bound.open(key) or not self._dequantizes(x2d):
            return
        dtype, launcher = x2d.dtype, self.dequant
        record = launcher.learned((dtype,))
        if record is None:   # direct launches off (OCTET_FAST_LAUNCH=0, the interpreter): no device to ask
            return
        device = launcher.current_device()
        if device != x2d.get_device():
            return
        g, where = self.fused, x2d.device
        gx, gy = self._dequant_grid(record.meta)
        c_launch, current, stream_of, linear = record.c_launch, launcher.current_device, launcher.stream, \
            torch.nn.functional.linear
        weight_on_stream = scratch_buffers.weight_on_stream
        q, scale, n, k, bias = g.qweight, g.w_scale, g.n, g.k, self._bias(dtype)
        plan = weakref.ref(self)    # not a cycle through this plan's own dict (triton_backend._W8A8Linear._bind)

        def call(x2d):
            if current() != device:   # the compiled kernel belongs to the device it was made on
                return plan()._run(x2d)
            stream = stream_of(device)
            # The float weight lives from this launch to cuBLAS's GEMM right after it on the same stream: the
            # stream's scratch serves every layer (scratch.py), unless autograd would keep it for backward.
            w = None if x2d.requires_grad else weight_on_stream(n, k, dtype, where, stream)
            if w is None:
                w = torch.empty((n, k), dtype=dtype, device=where)
            c_launch(gx, gy, 1, stream, (q, scale, w, k))
            return linear(x2d, w, bias)
        self._bound[key] = call


def w8a16_linear(x2d: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor,
                 bias: torch.Tensor | None) -> torch.Tensor:
    """Weight-only INT8 linear, one-shot (see W8A16Linear)."""
    check_float_gemm(x2d, qweight, w_scale, bias)
    return W8A16Linear(qweight, w_scale, bias)(x2d)


def tuned_configs() -> dict:
    """The autotuner's choice per key (M bucket, N, K, USE_TMA, ...), for bench reports."""
    return {str(key): {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
            for key, cfg in _tuned_kernel.cache.items()}
