"""INT8 compute for Octet: the backends, the one place that picks among them, the custom ops.

This package knows nothing of Octet's model code or of ComfyUI; it takes an ``Int8Operands``
record (int8 weight, per-output-channel scale, bias, SmoothQuant divisor, conv geometry) and float
activations, and returns float outputs. Layers ask ``dispatch.plan`` once per input signature and
keep the run function it returns; ``linear``/``conv2d``/``static_mlp`` are one-shot conveniences.

  registry.py   Request, Implementation, select (+ logged-once fallbacks)
  operands.py   Int8Operands, ConvGeometry (the one conv output-size formula)
  dispatch.py   plan / plan_mlp and the one-shot entry points
  vram.py       the VRAM reserve Octet's own allocations leave free (the host registers its own)
  graph_pool.py memory kept past a call, allocated outside torch.compile's CUDA-graph warm-up pool
  ops.py        the torch.compile custom ops (one layer)
  torch_ref.py  the exact reference: every backend is tested against it
  backends/     reference, cpu, float, triton, bitsandbytes
"""
from __future__ import annotations

from . import graph_pool, registry, torch_ref
from .operands import ConvGeometry, Int8Operands, pair
from .registry import Backend, Implementation, Request
from . import backends as _backends  # noqa: E402,F401  (registers every backend)
from . import dispatch, ops  # noqa: E402
from .dispatch import plan, plan_mlp  # noqa: E402

__all__ = ["Backend", "Implementation", "Request", "Int8Operands", "ConvGeometry", "graph_pool", "registry",
           "torch_ref", "dispatch", "ops", "plan", "plan_mlp", "linear", "conv2d", "static_mlp", "quantize_weight",
           "dequantize_weight", "pair"]

quantize_weight = torch_ref.quantize_weight
dequantize_weight = torch_ref.dequantize_weight


def linear(x, qweight, w_scale, bias=None, *, act="dynamic", smooth=None, static_scale=None, backend="auto",
           goal="speed"):
    """One-shot y = x @ dequant(qweight).T + bias (tests, benches): traced as octet::linear under
    torch.compile, otherwise planned and run once. Layers keep their plan instead (octet/modules.py)."""
    if ops.compiling():
        dispatch.check_static(act, static_scale)
        return ops.linear(x, qweight, w_scale, bias, smooth, static_scale, act, backend, goal)
    return dispatch.linear(x, qweight, w_scale, bias, act=act, smooth=smooth, static_scale=static_scale,
                           backend=backend, goal=goal)


def conv2d(x, qweight, w_scale, bias=None, stride=1, padding=0, dilation=1, groups=1, *, act="dynamic", smooth=None,
           static_scale=None, backend="auto", goal="speed"):
    if ops.compiling() and not isinstance(padding, str):
        dispatch.check_static(act, static_scale)
        stride, padding, dilation = (list(pair(v)) for v in (stride, padding, dilation))
        return ops.conv2d(x, qweight, w_scale, bias, smooth, static_scale, stride, padding, dilation, groups, act,
                          backend, goal)
    return dispatch.conv2d(x, qweight, w_scale, bias, stride, padding, dilation, groups, act=act, smooth=smooth,
                           static_scale=static_scale, backend=backend, goal=goal)


def static_mlp(x, fc1: tuple, fc2: tuple, *, backend="auto"):
    """fc2(gelu_tanh(fc1(x))) for two static W8A8 linears, each (qweight, w_scale, bias, smooth,
    static_scale): fused where one backend takes both layers and has a chain."""
    if ops.compiling():
        dispatch.check_mlp(fc1, fc2)
        return ops.static_mlp(x, *fc1, *fc2, backend)
    return dispatch.static_mlp(x, fc1, fc2, backend=backend)
