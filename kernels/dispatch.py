"""From a request to a run function: ``plan`` selects a backend once and lets it prepare.

``plan(op, act, x, operands)`` is what a layer calls the first time it sees an input signature
(device, dtype, M bucket); the returned function is all it calls afterwards. ``linear``,
``conv2d`` and ``static_mlp`` are one-shot conveniences over the same path (tests, benches, the
custom ops); they prepare on every call, so hot code keeps the plan instead.
"""
from __future__ import annotations

import logging
from typing import Callable, Optional

import torch

from . import registry, vram
from .operands import ConvGeometry, Int8Operands

Tensor = torch.Tensor


# Whether the calls being planned now will replay from a CUDA graph: octet.cuda_graph sets it around
# warm-up and capture. A replay has no host cost per layer (Python, allocations, launches), so backends
# choose by GPU time alone there, while an eager step pays the host cost of every layer and a layer that
# saves GPU time can still lose. Layers key their plans on it: one plan for eager calls, one for graphs.
graph_plans = registry.PlanningScope()
planning_for_graph = graph_plans.active


# How many plans have been made in this process: what a cached "no" about some layer's plan (octet/deferred.py's
# declined deferrals) is valid for; a new plan anywhere may change that answer.
_plans_made = [0]


def plans_made() -> int:
    return _plans_made[0]


def rows(x: Tensor) -> int:
    return x.numel() // x.shape[-1] if x.dim() else 0


def request(op: str, act: str, x: Tensor, w: Int8Operands, goal: str = "speed") -> registry.Request:
    if op == "linear":
        m = rows(x)
    else:
        kh, kw = w.qweight.shape[2:]
        oh, ow = w.conv.output_size(x.shape[-2], x.shape[-1], kh, kw)
        m = x.shape[0] * max(oh, 0) * max(ow, 0)
    return registry.Request(op=op, act=act, device=x.device.type, dtype=str(x.dtype).replace("torch.", ""),
                            m=m, n=w.n, k=w.k, groups=w.conv.groups if w.conv else 1, goal=goal,
                            eager=not planning_for_graph())


# The speed goal keeps a float copy of a layer's weight where the float path wins (VRAM: that layer in bf16 again),
# made at the layer's first call, only where it leaves the inference reserve free (kernels/vram.py); elsewhere the
# layer is planned as with the memory goal (int8 weight read by W8A16 or INT8 kernels, no copy).
log = logging.getLogger("octet")
_short_of_vram = [0]     # layers planned with the memory goal for want of VRAM (logged at the first)


def float_copy_fits(x: Tensor, w: Int8Operands) -> bool:
    """Whether the speed goal may keep a float copy of ``w`` in ``x``'s dtype: on a GPU, only with the reserve
    left free after it (a copy made earlier stays)."""
    return ("float", x.dtype) in w.memo or vram.leaves_reserve(x.device, w.qweight.numel() * x.dtype.itemsize)


def _goal(goal: str, x: Tensor, w: Int8Operands) -> str:
    """``goal``, or "memory" where the speed goal's float copy of ``w`` would not leave the reserve free."""
    if goal != "speed" or float_copy_fits(x, w):
        return goal
    _short_of_vram[0] += 1
    if _short_of_vram[0] == 1:
        log.warning("Octet: goal speed, but a bf16 copy of a %d x %d layer's weight would leave less than %.1f GiB "
                    "of VRAM free (%.2f GiB free now): layers short of VRAM are planned as with goal memory "
                    "(no copy; slower on the layers INT8 does not speed up). Free VRAM, or choose goal memory, "
                    "to silence this (OCTET_VRAM_RESERVE_MIB raises the reserve).", w.n, w.k,
                    vram.reserve(x.device) / 2**30, vram.free(x.device) / 2**30)
    return "memory"


def plan(op: str, act: str, x: Tensor, w: Int8Operands, backend: str = "auto", goal: str = "speed",
         one_call: bool = False) -> tuple[registry.Implementation, Callable[[Tensor, Optional[Tensor]], Tensor]]:
    """(chosen implementation, run(x, static_scale)) for this signature.

    ``one_call``: a plan for one call, kept nowhere (a layer streamed from RAM plans at each call on that call's
    copy of its weight; the functional ``linear`` / ``conv2d``). It is not counted in ``plans_made``: it changes no
    answer a kept plan could give, and counting it made every deferred LayerNorm / GELU of a streamed model ask its
    consumers again at every call. Its Triton kernels learn no direct launch (registry.one_call_plans): learning
    launches a kernel twice more, which only a kept plan's later calls repay."""
    if act not in registry.ACT_MODES:
        raise ValueError(f"act must be one of {registry.ACT_MODES}, got {act!r}")
    req = request(op, act, x, w, _goal(goal, x, w))
    impl = registry.select(req, backend)
    if not one_call:
        _plans_made[0] += 1
        return impl, impl.prepare(req, w)
    with registry.one_call_plans():
        return impl, impl.prepare(req, w)


def plan_mlp(x: Tensor, w1: Int8Operands, w2: Int8Operands, backend: str = "auto"):
    """run(x, scale1, scale2) for fc2(gelu_tanh(fc1(x))) with two static W8A8 linears: fused where
    one backend takes both layers and has a chain, else the two layers' own plans."""
    req1 = request("linear", "static", x, w1, _goal("speed", x, w1))
    req2 = request("linear", "static", x, w2, _goal("speed", x, w2))
    impl1, impl2 = registry.select(req1, backend), registry.select(req2, backend)
    _plans_made[0] += 1
    if impl1 is impl2 and impl1.prepare_mlp is not None:
        return impl1.prepare_mlp(req1, w1, w2)
    # The two layers are worth different backends (e.g. a small fc2 goes to the float path): no
    # chain to fuse, each layer runs where the dispatcher puts it.
    run1, run2 = impl1.prepare(req1, w1), impl2.prepare(req2, w2)
    return lambda x, s1, s2: run2(torch.nn.functional.gelu(run1(x, s1), approximate="tanh"), s2)


def check_static(act: str, static_scale) -> None:
    if act == "static" and static_scale is None:
        raise ValueError("act='static' needs static_scale (run Calibrate first, or use act='dynamic').")


def linear(x: Tensor, qweight: Tensor, w_scale: Tensor, bias: Optional[Tensor] = None, *, act: str = "dynamic",
           smooth: Optional[Tensor] = None, static_scale: Optional[Tensor] = None, backend: str = "auto",
           goal: str = "speed") -> Tensor:
    """y = x @ dequant(qweight).T + bias with INT8 weights (and INT8 activations unless act='none')."""
    check_static(act, static_scale)
    w = Int8Operands.of(qweight, w_scale, bias, smooth, device=x.device)
    return plan("linear", act, x, w, backend, goal, one_call=True)[1](x, _scale_on(static_scale, act, x))


def conv2d(x: Tensor, qweight: Tensor, w_scale: Tensor, bias: Optional[Tensor] = None, stride=1, padding=0,
           dilation=1, groups: int = 1, *, act: str = "dynamic", smooth: Optional[Tensor] = None,
           static_scale: Optional[Tensor] = None, backend: str = "auto", goal: str = "speed") -> Tensor:
    check_static(act, static_scale)
    w = Int8Operands.of(qweight, w_scale, bias, smooth, ConvGeometry.of(stride, padding, dilation, groups),
                        device=x.device)
    return plan("conv2d", act, x, w, backend, goal, one_call=True)[1](x, _scale_on(static_scale, act, x))


def static_mlp(x: Tensor, fc1: tuple, fc2: tuple, *, backend: str = "auto") -> Tensor:
    """fc2(gelu_tanh(fc1(x))) for two static W8A8 linears, each given as
    (qweight, w_scale, bias, smooth, static_scale)."""
    check_mlp(fc1, fc2)
    w1 = Int8Operands.of(*fc1[:4], device=x.device)
    w2 = Int8Operands.of(*fc2[:4], device=x.device)
    return plan_mlp(x, w1, w2, backend)(x, _scale_on(fc1[4], "static", x), _scale_on(fc2[4], "static", x))


def check_mlp(fc1: tuple, fc2: tuple) -> None:
    for name, fc in (("fc1", fc1), ("fc2", fc2)):
        if len(fc) != 5 or fc[4] is None:
            raise ValueError(f"static_mlp: {name} must be (qweight, w_scale, bias, smooth, static_scale) "
                             f"with a static scale (run Calibrate first)")


def _scale_on(static_scale: Optional[Tensor], act: str, x: Tensor) -> Optional[Tensor]:
    if act != "static" or static_scale is None:
        return None
    return static_scale.reshape(1).to(device=x.device, dtype=torch.float32)
