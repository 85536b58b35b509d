"""The float path: cuBLAS/cuDNN in x's dtype on the dequantized weight.

AUTO lands here on a GPU when the INT8 kernels would be slower than plain bf16 for a request
(tiny GEMMs where launch overhead dominates, weight-only layers at large M, GPUs without the
Triton configs): the dispatcher's promise is never to be slower than the float model. What it
costs depends on the layer's goal (``Request.goal``):

* ``speed``: the dequantized weight is made once per layer and dtype and kept (VRAM: a bf16 copy
  of that layer, reported by ``octet.modules.plan_summary``); the call is then exactly a bf16 layer.
  Before plans existed this path dequantized on every call (SDXL: 1472 copy_ + 786 mul launches
  per step).
* ``memory``: no float copy is kept; linear layers run the W8A16 kernel, which reads the int8
  weight directly, where Triton can run; otherwise the weight is dequantized per call.

The numbers are *more* accurate than W8A8 (activations stay in float), so this is a fallback for
speed, not an emulation of INT8 error; ``backend="torch"`` is the bit-exact INT8 reference.
On CPU the ``cpu`` backend is used instead (this path is rejected there).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import registry, torch_ref
from . import triton_support

NAME = registry.Backend.FLOAT.value


def _unsmoothed(x: torch.Tensor, smooth, channel_dim: int) -> torch.Tensor:
    # SmoothQuant folded `smooth` into the weight (W * s); the activation must be divided by it,
    # whether or not it is then quantized. Back in x's dtype for cuBLAS/cuDNN.
    return x if smooth is None else torch_ref.smoothed(x, smooth, channel_dim).to(x.dtype)


def _weight(req, w, dtype):
    if req.goal == "speed":
        return w.remember(("float", dtype), lambda: w.float_weight(dtype))
    return w.float_weight(dtype)


def _kept(req: registry.Request, w):
    """(float weight, bias) in the plan's dtype, made at planning, where the speed goal keeps them and
    no SmoothQuant divisor has to be applied to x first; else None. A plan's dtype is fixed (it is
    part of the signature), so the call is then F.linear / F.conv2d and nothing else: on a host-bound
    eager step every microsecond of Python per layer shows."""
    dtype = getattr(torch, req.dtype, None)
    if req.goal != "speed" or w.smooth is not None or not isinstance(dtype, torch.dtype):
        return None
    return _weight(req, w, dtype), None if w.bias is None else w.bias.to(dtype)


def prepare(req: registry.Request, w):
    bias = w.bias
    if req.op == "linear":
        if req.goal == "memory" and w.device.type == "cuda" and triton_support.unavailable_reason() is None:
            from . import triton_w8a16

            linear = triton_w8a16.W8A16Linear(w.qweight, w.scale, bias)

            def run_w8a16(x, static):
                x2d = _unsmoothed(x, w.smooth, -1).reshape(-1, w.k)
                return linear(x2d).reshape(*x.shape[:-1], w.n)
            return run_w8a16

        def run_linear(x, static):
            b = None if bias is None else bias.to(x.dtype)
            return F.linear(_unsmoothed(x, w.smooth, -1), _weight(req, w, x.dtype), b)
        kept = _kept(req, w)
        if kept is not None:   # speed goal: exactly a bf16 layer per call, nothing else
            wf, bf = kept
            return lambda x, static: F.linear(x, wf, bf) if x.dtype is wf.dtype else run_linear(x, static)
        return run_linear
    args = w.conv.args()

    def run_conv(x, static):
        b = None if bias is None else bias.to(x.dtype)
        return F.conv2d(_unsmoothed(x, w.smooth, 1), _weight(req, w, x.dtype), b, *args)
    kept = _kept(req, w)
    if kept is not None:
        wf, bf = kept
        return lambda x, static: F.conv2d(x, wf, bf, *args) if x.dtype is wf.dtype else run_conv(x, static)
    return run_conv


def _rejects(req: registry.Request):
    if req.device != "cuda":
        return "the float path only pays on a GPU; the CPU uses its own path"
    return None


IMPLEMENTATION = registry.register(registry.Implementation(
    name=NAME, unavailable_reason=lambda: None, rejects=_rejects, prepare=prepare, priority=10))
