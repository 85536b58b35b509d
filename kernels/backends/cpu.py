"""The fast CPU path: what AUTO runs on a CPU (the demo, CI, users without a GPU).

The reference (torch_ref) favours exactness over speed: it transposes the weight, converts every
intermediate and computes conv epilogues in float64 on every call, which made the demo's dynamic
W8A8 9x slower than float. Here the weight side is prepared once per layer (``Int8Operands.memo``)
and each call does only the activation work:

* linear (dynamic/static): the oracle's own quantization, the int8 GEMM, and the oracle's epilogue
  applied in place. Bit-identical to torch_ref. The GEMM is chosen once per process by timing
  (``int_mm_pays``): ``torch._int_mm`` on the cached transposed int8 weight where the CPU has int8
  dot-product instructions (oneDNN with VNNI: ~4x faster than fp32 matmul), else fp32 matmul of the
  int8 codes against a cached fp32 copy of the weight codes. On an AVX-512 Xeon without VNNI
  ``_int_mm`` measured 45-60x *slower* than fp32 matmul, and the demo's dynamic W8A8 took 4.0x float
  time; exact integer sums make the two paths equal (below).
* conv2d (dynamic/static): the int8 codes are convolved as float32 by oneDNN against a cached
  float32 copy of the weight codes (no int8 conv exists on CPU; im2col + int GEMM was 20 % of a
  step), then the oracle's float64 epilogue. Integer sums are exact in fp32 up to 2^24 (real
  activations stay far below: products are +-16129 with random signs), so the result is the
  oracle's bit for bit; only a sum past 2^24 would round, at ~6e-8 relative.
* weight-only: F.linear / F.conv2d on a cached dequantized weight (goal "speed"), or dequantized
  per call (goal "memory").
The cost: a cached float copy of conv/weight-only weights in CPU RAM (the CPU path buys speed, not memory).
"""
from __future__ import annotations

import functools
import os
import time

import torch
import torch.nn.functional as F

from .. import registry, torch_ref

NAME = registry.Backend.CPU.value


def _rejects(req: registry.Request):
    return None if req.device == "cpu" else "the CPU path runs CPU tensors only"


def _float_weight(req, w, dtype):
    if req.goal == "memory":
        return w.float_weight(dtype)
    return w.remember(("float", dtype), lambda: w.float_weight(dtype))


@functools.lru_cache(maxsize=None)
def int_mm_pays() -> bool:
    """Whether ``torch._int_mm`` beats fp32 matmul of the same codes on this CPU: timed once per process
    at a demo-sized shape (best of 3, ~0.1 s where _int_mm is slow). OCTET_CPU_INT_MM=1 / 0 forces it."""
    forced = os.environ.get("OCTET_CPU_INT_MM")
    if forced in ("0", "1"):
        return forced == "1"
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (256, 512), generator=g, dtype=torch.int8)
    b = torch.randint(-127, 128, (512, 256), generator=g, dtype=torch.int8)
    af, bf = a.float(), b.float()

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(3):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)

    pays = best(lambda: torch._int_mm(a, b)) < best(lambda: torch.mm(af, bf))
    registry.log_once("cpu-int-mm", f"Octet CPU path: {'torch._int_mm' if pays else 'fp32 matmul of the int8 codes'} "
                      f"for INT8 Linear layers (the faster on this CPU; both give the same integer sums)")
    return pays


def _linear(req, w):
    bias = w.bias
    if req.act == "none":
        def run_w8a16(x, static):
            return F.linear(x, _float_weight(req, w, x.dtype), None if bias is None else bias.to(x.dtype))
        return run_w8a16
    if int_mm_pays():
        wt = w.remember("int8_t", lambda: w.qweight.t().contiguous())   # [K, N], what _int_mm reads
        gemm = lambda xq: torch._int_mm(xq, wt).float()                 # noqa: E731
    else:
        # The codes as fp32: every product is an integer of at most 127*127 and every partial sum stays
        # exact below 2^24, which real activations keep to (as in the conv path below), so these are
        # _int_mm's sums bit for bit.
        wt32 = w.remember("codes_t_f32", lambda: w.qweight.t().float().contiguous())
        gemm = lambda xq: torch.mm(xq.float(), wt32)                     # noqa: E731
    w_row = w.scale.reshape(1, -1)
    b32 = None if bias is None else bias.float()

    def run(x, static):
        shape = x.shape
        x2d = x.reshape(-1, shape[-1])
        xq, xs = torch_ref.quantize_rows(x2d, w.smooth, static)
        y = gemm(xq)
        y.mul_(xs).mul_(w_row)          # the oracle's gemm_epilogue, same order, in place
        if b32 is not None:
            y.add_(b32)
        return y.to(x.dtype).reshape(*shape[:-1], w.n)
    return run


def _conv2d(req, w):
    stride, padding, dilation, groups = w.conv.args()
    bias = w.bias
    if req.act == "none":
        def run_w8a16(x, static):
            return F.conv2d(x, _float_weight(req, w, x.dtype), None if bias is None else bias.to(x.dtype),
                            stride, padding, dilation, groups)
        return run_w8a16
    codes = w.remember("codes_f32", lambda: w.qweight.float())
    w_col64 = w.scale.double().reshape(1, -1, 1, 1)
    b64 = None if bias is None else bias.double().reshape(1, -1, 1, 1)

    def run(x, static):
        xs = torch_ref.smoothed(x, w.smooth, channel_dim=1)
        if static is None:
            scale = torch_ref.sample_scales(xs)
        else:
            scale = static.float().reshape(1).expand(xs.shape[0])
        s4 = scale.reshape(-1, 1, 1, 1)
        xq = torch_ref.round_to_grid(xs / s4)   # int8 codes, kept as float
        acc = F.conv2d(xq, codes, None, stride, padding, dilation, groups)
        # The oracle's epilogue, in float64 on the (integer-valued) sums: with sums below 2^24, which
        # real activations keep to, the result is bit-identical to torch_ref. That matters more than it
        # looks: an INT8 network is discontinuous, and one-ulp differences flip codes downstream.
        y = acc.double().mul_(s4.double()).mul_(w_col64)
        if b64 is not None:
            y.add_(b64)
        return y.to(x.dtype)
    return run


def prepare(req: registry.Request, w):
    return _linear(req, w) if req.op == "linear" else _conv2d(req, w)


def prepare_mlp(req: registry.Request, w1, w2):
    fc1, fc2 = _linear(req, w1), _linear(req, w2)

    def run(x, s1, s2):
        # torch_ref.static_mlp keeps fc1's output in fp32 before the GELU; so do we.
        h = fc1(x.float(), s1)
        return fc2(F.gelu(h, approximate="tanh"), s2).to(x.dtype)
    return run


IMPLEMENTATION = registry.register(registry.Implementation(
    name=NAME, unavailable_reason=lambda: None, rejects=_rejects, prepare=prepare, priority=5,
    prepare_mlp=prepare_mlp))
