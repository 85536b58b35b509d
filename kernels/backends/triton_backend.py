"""The Triton INT8 backend's registry record, and the dispatcher's rules for it.

``rejects`` says whether the Triton path *can* run a request; ``declines`` (consulted by AUTO
only) whether it is *worth* it. When either says no, the registry moves on to the next backend
by priority (on a GPU the float path in ``float_fallback``, on CPU the torch reference) and logs
the reason once.

Can run (``rejects``):
  * device: CUDA, or CPU under TRITON_INTERPRET=1 (CI runs the GPU kernels through numpy);
  * SM version: INT8 tensor cores start at sm75, but the tile configs here assume sm80's
    cp.async/ldmatrix and shared-memory sizes, so sm75 goes to the float path;
  * activation dtype fp16/bf16/fp32; conv groups == 1.
Worth it (``declines``, AUTO only):
  * not on CPU: the interpreter is for tests, so AUTO keeps the torch reference there even with
    TRITON_INTERPRET=1 set (CI sets it for the whole suite);
  * a cost model fitted to measurements (``_COSTS``): where launch overhead and the extra
    activation pass make the INT8 path slower than dequantize + cuBLAS/cuDNN, the float path wins.
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch

import torch.nn.functional as F

from .. import graph_pool, registry, switches
from . import scratch as scratch_buffers
from . import triton_support

NAME = "triton"
_DTYPES = ("float16", "bfloat16", "float32")

# The dispatcher's cost model. A layer call costs GPU time, except where the layer is launch-bound: where
# even the float path's GPU work is shorter than its host time, the step waits for the host, and in an
# eager step a layer then costs max(host time, GPU time) (INT8's two launches lose to cuBLAS's one). A
# replayed CUDA graph has no host time per layer (Request.eager False), so GPU time alone decides there.
# Why not max(host, GPU) for every eager layer: that assumes the GPU idles while the host issues the next
# layer, which holds for SDXL/SD3.5 at batch 1 on an H200 but not for Flux or Wan (the GPU queue is
# deep), nor on slower GPUs; measured 2026-12-02 on the H200, it kept bf16 copies of Flux's 512-token
# text-stream layers (+4.8 GiB) for no measurable step time (141.3 vs 143.8 ms).
#
# Host time per call, measured on an H200 (bench/overhead.py, docs/BENCHMARKS.md, 2026-12-03): a Triton W8A8
# linear through its bound call (_W8A8Linear._bind: quantize + GEMM through Triton's C launcher, codes in the
# stream's scratch, one allocation) 22-26 us in most rows (35-39 through the general path the session before,
# 76-126 with Triton's Python launcher, 140-250 before direct launches); a float-path linear 19 us (bf16
# nn.Linear 15-20 in the same run), weight-only 25-29 us at M=16 and 36-41 at M=4096 (dequantize + cuBLAS;
# 36-37 with its bound dequantize launch, 25-34 with its float weight in the stream's scratch, later calls).
# An 80 us constant fitted on an H100 before any of this let eager SD3.5 put layers on INT8 that then made the
# step host-bound. (Where the float path is launch-bound, INT8's larger host time still loses whatever its
# value, so this mostly moves which layers count as launch-bound.)
_HOST_S = {"float": 20e-6, "w8a8": 25e-6, "w8a16": 30e-6, "float_conv": 35e-6, "w8a8_conv": 150e-6}
# GPU time = bytes of the extra passes / bandwidth + max(reading the weight / bandwidth, 2*M*N*K / achieved
# rate), fitted to bench/kernels.py on an H100 80GB HBM3 (torch 2.11, Triton 3.6, 2026-11-26): the float
# path pays ~23 bytes per weight element when it dequantizes per call (int8 -> fp32, scale, cast: three
# torch passes; the speed goal keeps a float copy instead and pays nothing), the W8A8 path ~6 bytes per
# activation element to quantize (the row kernel measured 3.9-5.1 bytes' worth at 1536-8960 wide on an H100,
# 2026-12-06, bench/quant_rows_sweep.py). The weight read decides at small M: 2 bytes per element in bf16, 1 in
# int8.
_BANDWIDTH = 3.0e12
_GPU = {
    # path:        (extra bytes per weight elem, per activation elem, weight bytes read, MAC/s * 2)
    "float":       (23.0, 0.0, 2.0, 700e12),
    "w8a8":        (0.0, 6.0, 1.0, 1100e12),
    "w8a16":       (1.0, 0.0, 1.0, 400e12),
    "float_conv":  (23.0, 0.0, 2.0, 350e12),   # cuDNN bf16 NCHW at SDXL shapes
    "w8a8_conv":   (0.0, 6.0, 1.0, 700e12),    # quantize (2 kernels) + weight reorder + conv
}
# Weight-only through the fused kernel pays only while the GEMM is bound by reading the weight.
W8A16_SMALL_M = 16


def estimated_seconds(path: str, m: int, n: int, k: int, pixels_x_channels: int | None = None, *,
                      eager: bool = True, kept: bool = False) -> float:
    """Estimated time of one call (see _HOST_S, _GPU): ``kept`` is a float path with a kept float weight
    (no per-call dequantization), ``eager`` False a call replayed from a CUDA graph."""
    gpu = _gpu_seconds(path, m, n, k, pixels_x_channels, kept)
    return max(_HOST_S[path], gpu) if eager else gpu


def _gpu_seconds(path: str, m: int, n: int, k: int, pixels_x_channels: int | None, kept: bool) -> float:
    w_bytes, a_bytes, read, rate = _GPU[path]
    if kept:
        w_bytes = 0.0
    act_elems = pixels_x_channels if pixels_x_channels is not None else m * k
    return (w_bytes * n * k + a_bytes * act_elems) / _BANDWIDTH + max(read * n * k / _BANDWIDTH, 2.0 * m * n * k / rate)


def _launch_bound(path: str, m: int, n: int, k: int, kept: bool) -> bool:
    """Whether the float path's GPU work on this layer is shorter than its host time (see the cost model)."""
    return _gpu_seconds(path, m, n, k, None, kept) < _HOST_S[path]


# Host time a deferred input adds to its consumer's eager call (octet/deferred.py: the pending tensor, its
# absorbed modulation, the fused norm/GELU quantizer and the GEMM through their general paths) beyond the
# float passes it replaces: SD3.5-medium on an H200 (2026-12-03, one call), 95 deferred LayerNorm inputs per
# step, 50.6 ms per eager step deferred vs 38.0 not (host-bound: all of it CPU time), ~130 us each. Its GPU
# saving (one float pass over the input, ~10-20 us) shows only where the GPU is busier than the host.
_DEFERRED_HOST_S = 130e-6


def deferral_pays(req: registry.Request) -> bool:
    """Whether an eager call should take a deferred input (octet/deferred.py) rather than the float op's output:
    where the consumer's own GPU time covers its host time with the deferral's added, so the host stays ahead
    (Flux's qkv and linear2, 240-400 us) and the saved pass shows; not where it is shorter (SD3.5's 50-70 us
    layers), which makes the step wait for the host. Replays (CUDA graphs) and CPU (the interpreter) always.
    ``OCTET_EAGER_DEFERRAL`` (read when a plan is made) overrides the estimate: 1 always, 0 never (benches)."""
    if req.device != "cuda" or not req.eager:
        return True
    forced = switches.read("OCTET_EAGER_DEFERRAL")
    if forced is not None:
        return forced != "0"
    gpu = _gpu_seconds("w8a8", max(req.m, 1), max(req.n, 1), max(req.k, 1), None, False)
    return gpu >= _HOST_S["w8a8"] + _DEFERRED_HOST_S


def int8_pays(req: registry.Request) -> bool:
    """Whether the Triton INT8 path is estimated faster than the float path for this request.
    Also useful to a quantization policy: where it is False, INT8 buys memory, not speed."""
    m, n, k = max(req.m, 1), max(req.n, 1), max(req.k, 1)
    kept = req.goal == "speed"
    eager = req.eager and _launch_bound("float_conv" if req.op == "conv2d" else "float", m, n, k, kept)
    if req.op == "conv2d":
        if req.act == "none":
            return False
        # k = C*KH*KW; the activation pass touches M*C elements, about M*k/9 for 3x3 convs.
        return (estimated_seconds("w8a8_conv", m, n, k, m * max(k // 9, 1), eager=eager)
                < estimated_seconds("float_conv", m, n, k, eager=eager, kept=kept))
    if req.act != "none" and m <= W8A16_SMALL_M and kept:
        # A few rows read the weight and do little else: INT8 reads half the bytes, and the speed goal's
        # alternative is a bf16 copy beside the int8 one (Flux's 76 modulation layers: +8.7 GiB, measured
        # 2026-12-02). Eager, the float path would save ~70 us of host time per call, which a GPU-bound step
        # (Flux, Wan) hides; not worth twice the layer's memory.
        return True
    if req.act == "none":
        # Measured on an H200 (docs/BENCHMARKS.md, fused kernels): >= 0.9x bf16 at M <= 16 (fused kernel)
        # and where one-pass dequantize + cuBLAS wins (prefers_dequant_cublas); between, weight-only
        # loses either way (0.26-0.81x), so AUTO leaves those shapes to the float path (goal decides).
        return m <= W8A16_SMALL_M or (m >= 1024 or (m >= 128 and n <= 4096))
    return (estimated_seconds("w8a8", m, n, k, eager=eager)
            < estimated_seconds("float", m, n, k, eager=eager, kept=kept))


def _device_reason(req: registry.Request) -> Optional[str]:
    if req.device == "cpu":
        return None if triton_support.interpreting() else "CPU tensors (Triton runs on CPU only under TRITON_INTERPRET=1)"
    if req.device != "cuda":
        return f"device type {req.device!r}"
    major, minor = triton_support.capability()
    if (major, minor) < (7, 5):
        return f"sm{major}{minor} has no INT8 tensor cores"
    if major < 8:
        return f"sm{major}{minor}: the Triton INT8 configs need sm80+ (cp.async, larger shared memory)"
    return None


def declines(req: registry.Request) -> Optional[str]:
    if req.device == "cpu":
        return "Triton on CPU is the test interpreter; AUTO keeps the torch reference (ask for 'triton' explicitly)"
    if req.device != "cuda" or req.m == 0:
        return None
    if not int8_pays(req):
        # One log line per size class (power of two of M*N*K), not per shape.
        work = max(req.m * req.n * req.k, 1).bit_length() - 1
        mode = "weight-only" if req.act == "none" else "INT8"
        return (f"{mode} {req.op} estimated slower than the float path at M*N*K ~2^{work} "
                f"{'in an eager step' if req.eager else 'in a CUDA graph'} (cost model: docs/BENCHMARKS.md)")
    return None


def rejects(req: registry.Request) -> Optional[str]:
    reason = _device_reason(req)
    if reason is None and req.dtype not in _DTYPES:
        reason = f"activation dtype {req.dtype}"
    if reason is None and req.op == "conv2d" and getattr(req, "groups", 1) != 1:
        reason = f"groups={req.groups} (implicit-GEMM conv handles groups == 1)"
    return reason


def _kernels():
    """The Triton kernel modules, imported on first use (importing them needs triton)."""
    reason = triton_support.unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"octet Triton kernels cannot run: {reason}")
    from . import triton_conv, triton_gemm, triton_quant
    return triton_quant, triton_gemm, triton_conv


def _conv_out_format(x: torch.Tensor) -> torch.memory_format:
    # Like F.conv2d: a channels_last input gives a channels_last output.
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _prepare_linear(req: registry.Request, w):
    triton_quant, triton_gemm, _ = _kernels()
    q, s, b, n, k = w.qweight, w.scale, w.bias, w.n, w.k
    if req.act == "none":
        from . import triton_w8a16

        # Small M: one launch reading the int8 weight as stored; large M: one-pass dequantize + cuBLAS
        # (triton_w8a16.prefers_dequant_cublas). Weight-only never keeps a float copy: it is for memory.
        linear = triton_w8a16.W8A16Linear(q, s, b)

        def run_w8a16(x, static):
            return linear(x.reshape(-1, k)).reshape(*x.shape[:-1], n)
        return run_w8a16

    # (triton_w8a8_static fuses the static quantization into the GEMM prologue, but on an H200 it was
    # slower than the separate pass below in CUDA-graph timing at 11 of 12 shapes, 2-6x at the Flux
    # shapes: docs/BENCHMARKS.md, fused kernels. So static keeps the separate quantization pass.)

    linear = _W8A8Linear(triton_quant, triton_gemm, w)
    linear.deferral_pays = deferral_pays(req)
    return linear


class _W8A8Linear:
    """One W8A8 linear plan: prepared once (the quantizer's launch config, the GEMM's scale vectors
    and weight descriptor, both kernels' direct launchers: triton_launch), called per step.

    ``gelu_input`` and ``norm_input`` are the deferred entries (octet/deferred.py): the layer's input is
    cat(head, gelu_tanh(pre)) or gelu_tanh(pre), or shift + layer_norm(x) * mult, and one quantization
    kernel computes it while it quantizes, instead of float passes before this layer. ``with_gelu`` is the
    same plan with GELU (tanh) in the GEMM's epilogue: an MLP's fc1 (octet/fusion.py), every entry alike."""

    deferral_pays = True                      # set per plan (deferral_pays above; eager small GEMMs: False)

    def __init__(self, triton_quant, triton_gemm, w, gelu: bool = False):
        self.k, self.n, self.smooth = w.k, w.n, w.smooth
        self.quantize = triton_quant.RowQuantizer(w.k, w.smooth)
        self.gemm = triton_gemm.W8A8Gemm(w.qweight, w.scale, w.bias, gelu=gelu)
        self._operands, self._gelu = (triton_quant, triton_gemm, w), None
        self._gelu_quantizers: dict = {}      # head width -> GeluRowQuantizer (one per call site)
        self._make_gelu = triton_quant.GeluRowQuantizer
        self._norm = None                     # NormRowQuantizer, made at the first deferred norm
        self._make_norm = triton_quant.NormRowQuantizer
        from . import triton_launch   # needs triton: imported with the kernels
        self._bound = triton_launch.BoundCalls()   # (shape, dtype, x aligned, static aligned) -> call (_bind)

    def with_gelu(self) -> "_W8A8Linear":
        """This plan with GELU (tanh) applied in the GEMM's epilogue, made at the first ask: its own kernels'
        launch records and bound calls (the GELU is a compile-time flag of the GEMM)."""
        if self._gelu is None:
            if self.gemm.gelu:
                return self
            with self._kept():
                self._gelu = _W8A8Linear(*self._operands, gelu=True)
            self._gelu.deferral_pays = self.deferral_pays
        return self._gelu

    def _kept(self):
        """For what this plan makes at a first call and keeps (the GELU twin, the deferred entries' quantizers): not
        in a CUDA-graph warm-up's pool (torch.compile's reduce-overhead runs these calls there: graph_pool.py)."""
        return graph_pool.outside(self._operands[2].qweight.device)

    def __call__(self, x, static):
        # The layer's own call (octet/modules.py): x is on the plan's device with K columns, and static is
        # None or a plan's fp32 [1] scale, so the checked entries' checks are skipped (host time per layer).
        if x.is_contiguous():
            key = (x.shape, x.dtype, x.data_ptr() % 16 == 0, static is None or static.data_ptr() % 16 == 0)
            bound = self._bound.get(key)
            if bound is not None:
                if bound:
                    return bound(x, static)
            else:
                y = self._run(x, static)
                self._bind(key, x, static)
                return y
        return self._run(x, static)

    def _quantized(self, x, static):
        """x's rows as int8 codes and scales, in the stream's scratch: read only by the GEMM launched next."""
        x2 = x if x.dim() == 2 and x.is_contiguous() else x.reshape(-1, self.k).contiguous()
        if static is not None and static.dtype != torch.float32:
            static = static.float()
        return self.quantize.run(x2, static, scratch=True)

    def _run(self, x, static):
        y = self.gemm.run(*self._quantized(x, static), x.dtype)
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.n)

    def _bind(self, key, x, static) -> None:
        """After the first call at ``key`` (Triton's dispatch has chosen and compiled both kernels there), the
        call with everything that is fixed at that key computed once: ~11 us of host time less per call than
        ``_run``'s general path on the H200 (bench/overhead.py: 22-26 us against 33-39). False where it cannot be (CPU, direct launches off, static
        scales of another dtype): ``_run`` then, every call."""
        if not self._bound.open(key) or (static is not None and static.dtype != torch.float32):
            return
        shape, dtype, x_aligned, static_aligned = key
        m = x.numel() // self.k
        quantize = self.quantize.bound(dtype, x_aligned, static is not None, static_aligned)
        gemm = self.gemm.bound(m, dtype, static is None, static_aligned)
        if quantize is None or gemm is None:
            return
        launcher = self.quantize.launcher
        device, k, out_shape = launcher.current_device(), self.k, (*shape[:-1], self.n)
        if device != x.get_device():   # learned() found records, so direct CUDA launches: x is on a GPU
            return
        current, stream_of, on_stream = launcher.current_device, launcher.stream, scratch_buffers.on_stream
        where = x.device
        # Weakly: the call is kept in this plan, and a strong reference back would make a cycle, which only the
        # cyclic garbage collector frees. A plan made for one call (a layer streamed from RAM) then kept its
        # weight's device copy until a collection ran (Flux-dev, 12 GiB free, H200 2026-12-04: 0.49 GiB of them).
        plan = weakref.ref(self)

        def call(x, static):
            if current() != device:   # compiled kernels and the scratch belong to the device they were made on
                return plan()._run(x, static)
            stream = stream_of(device)
            shared = on_stream(m, k, device, stream)
            if shared is None:        # capturing a graph, or above the scratch's limit: fresh tensors
                q = torch.empty((m, k), dtype=torch.int8, device=where)
                scales = static if static is not None else torch.empty((m,), dtype=torch.float32, device=where)
            else:
                q, scales = shared[0], static if static is not None else shared[1]
            quantize(m, stream, x, q, scales)
            out = torch.empty(out_shape, dtype=dtype, device=where)
            gemm(stream, q, scales, out)
            return out
        self._bound[key] = call

    def gelu_input(self, head, pre, static, residual=None):
        k1 = 0 if head is None else head.shape[-1]
        quantize = self._gelu_quantizers.get(k1)
        if quantize is None:
            # OCTET_RECIP_CODES=0: codes by the division instead of the scale's reciprocal (triton_quant's
            # GeluRowQuantizer, NormRowQuantizer), read when a call site's quantizer is made, so that bench/e2e.py can
            # time a step without it (octet_dynamic_divided)
            with self._kept():
                quantize = self._gelu_quantizers[k1] = self._make_gelu(
                    k1, self.k - k1, self.smooth, reciprocal_codes=switches.on("OCTET_RECIP_CODES"))
        xq, xs = quantize(head, pre, static)
        return self._output(xq, xs, pre, residual)

    def _output(self, xq, xs, x, residual=None):
        """The GEMM of these codes, shaped as x's rows; with ``residual`` (res, gate; ``takes_residual`` checked)
        ``res + output * gate`` in its epilogue, rounded as the host's ``res += output * gate`` (the compiled graph's
        gated residual, octet/compile_pass.py)."""
        if residual is None:
            return self.gemm(xq, xs, x.dtype).reshape(*x.shape[:-1], self.n)
        return self._residual(xq, xs, *residual, host_rounding=True)

    def takes_residual(self, x, res, gate) -> bool:
        """Whether ``residual_output`` can add ``res + output * gate``: res is this layer's output's shape and dtype
        with unit column stride, gate one row per batch entry (or one for all) in that dtype."""
        from . import triton_layernorm
        return (not self.gemm.gelu and res.shape == (*x.shape[:-1], self.n) and res.dtype == x.dtype
                and res.device == x.device and res.dim() in (2, 3) and res.stride(-1) == 1
                and triton_layernorm.batch_rows(gate, res) is not None)

    def residual_output(self, x, static, res, gate, host_rounding=False):
        """``res + layer(x) * gate`` (a block's gated residual after this layer, as ``torch.addcmul``; with
        ``host_rounding`` as ``res + layer(x) * gate`` rounds in torch) with the sum in the GEMM's epilogue
        (triton_gemm.W8A8Gemm.run_residual); the caller checked ``takes_residual``."""
        return self._residual(*self._quantized(x, static), res, gate, host_rounding)

    def _residual(self, xq, xs, res, gate, host_rounding):
        from . import triton_layernorm
        gate, stride = triton_layernorm.batch_rows(gate, res)
        tokens = res.shape[1] if res.dim() == 3 else res.shape[0]
        return self.gemm.run_residual(xq, xs, res.reshape(-1, self.n), gate, tokens, stride,
                                      host_rounding).reshape(res.shape)

    def takes_norm(self, x, mult, shift) -> bool:
        return x.shape[-1] == self.k and self._make_norm.takes(x, mult, shift)

    def norm_input(self, x, eps, mult, shift, static, residual=None):
        if self._norm is None:
            with self._kept():
                self._norm = self._make_norm(self.k, self.smooth,
                                             reciprocal_codes=switches.on("OCTET_RECIP_CODES"))   # see gelu_input
        xq, xs = self._norm(x, eps, mult, shift, static)
        return self._output(xq, xs, x, residual)


def _prepare_conv(req: registry.Request, w):
    _, _, triton_conv = _kernels()
    q, s, b, sm = w.qweight, w.scale, w.bias, w.smooth
    kh, kw = q.shape[2], q.shape[3]
    stride, dilation = w.conv.stride, w.conv.dilation
    padding = w.conv.explicit_padding(kh, kw)
    if req.act == "none":
        # Weight-only conv: cuDNN on the dequantized weight (see float_fallback.py for why an INT8
        # kernel does not pay without INT8 activations).
        def run_w8a16(x, static):
            wf = w.remember(("float", x.dtype), lambda: w.float_weight(x.dtype)) if req.goal == "speed" \
                else w.float_weight(x.dtype)
            y = F.conv2d(x, wf, None if b is None else b.to(x.dtype), stride, padding, dilation)
            return y.contiguous(memory_format=_conv_out_format(x))
        return run_w8a16

    khwc = w.remember("khwc", lambda: q.permute(0, 2, 3, 1).contiguous())   # the kernel's weight order, once
    conv = triton_conv.ConvW8A8(q, s, b, stride, padding, dilation, 1, sm, weight_khwc=khwc)

    def run(x, static):
        return conv(x, static)
    return run


def prepare(req: registry.Request, w):
    return _prepare_linear(req, w) if req.op == "linear" else _prepare_conv(req, w)


def prepare_mlp(req: registry.Request, w1, w2):
    """fc2(gelu_tanh(fc1(x))), both static W8A8: three launches (quantize x; fc1 with GELU and fc2's
    quantization in its epilogue; fc2) instead of six, and no float hidden tensor."""
    triton_quant, triton_gemm, _ = _kernels()
    quantize = triton_quant.RowQuantizer(w1.k, w1.smooth)
    fc1 = triton_gemm.W8A8Gemm(w1.qweight, w1.scale, w1.bias, gelu_quant=True, q_smooth=w2.smooth)
    fc2 = triton_gemm.W8A8Gemm(w2.qweight, w2.scale, w2.bias)

    def run(x, s1, s2):
        xq, xs = quantize(x.reshape(-1, w1.k).contiguous(), s1)
        y = fc2(fc1(xq, xs, x.dtype, q_scale=s2), s2, x.dtype)
        return y.reshape(*x.shape[:-1], w2.n)
    return run


IMPLEMENTATION = registry.register(registry.Implementation(
    name=NAME,
    unavailable_reason=triton_support.unavailable_reason,
    rejects=rejects,
    prepare=prepare,
    priority=20,
    declines=declines,
    prepare_mlp=prepare_mlp,
))
