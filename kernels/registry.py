"""One registry of INT8 backends and the one place that picks among them.

Every backend registers a frozen ``Implementation`` record. ``select`` chooses from the request
(format, op, activation mode, device, shape, goal) and the user's explicit wish; whenever the choice
differs from what was asked, or a faster path is unavailable, it logs that once per reason, so
fallbacks are never silent and never spam the console.

``select`` is not cached here: its answer depends on the environment (TRITON_INTERPRET, which
backends imported) and callers already cache what they derive from it, per input signature, in a
plan (``dispatch.plan``). So a changed environment takes effect for every plan made afterwards.
"""
from __future__ import annotations

import contextlib
import enum
import logging
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

log = logging.getLogger("octet.kernels")

FORMATS = ("int8",)
ACT_MODES = ("none", "dynamic", "static")
OPS = ("linear", "conv2d")
GOALS = ("speed", "memory")


class Backend(str, enum.Enum):
    AUTO = "auto"
    TRITON = "triton"
    BNB = "bitsandbytes"
    CPU = "cpu"        # fast CPU path (torch._int_mm / float conv on the int8 codes)
    TORCH = "torch"    # the exact reference (kernels/torch_ref.py): the oracle
    FLOAT = "float"    # dequantized weight + cuBLAS/cuDNN: AUTO's GPU fallback where INT8 loses


def m_bucket(m: int) -> int:
    """Signature bucket for M (tokens, or pixels x batch): powers of two up to 16384. Plans and the
    Triton autotuner are keyed on it, so a bucket shares one kernel choice."""
    return min(1 << max(m - 1, 0).bit_length(), 16384)


@dataclass(frozen=True)
class Request:
    """What one quantized layer asks for at one input signature."""
    op: str            # "linear" | "conv2d"
    act: str           # "none" (weight-only) | "dynamic" | "static"
    device: str        # torch device type: "cpu", "cuda", ...
    dtype: str         # activation dtype name, e.g. "bfloat16"
    m: int = 0         # tokens (linear) or output pixels x batch (conv); 0 = unknown
    n: int = 0
    k: int = 0
    groups: int = 1    # conv2d only: backends differ in which groupings they implement
    fmt: str = "int8"  # the weight format (a layout's name); every backend here reads int8
    goal: str = "speed"  # where INT8 loses: keep a float weight (speed) or read int8 directly (memory)
    eager: bool = True   # False while planning for a CUDA graph (dispatch.graph_plans): no host cost per call


class PlanningScope:
    """A process-wide mark on the plans made inside ``with scope():`` (scopes nest), read as ``scope.active()``: what
    kind of plan is being prepared, for code that sees only the request or less (dispatch.graph_plans,
    one_call_plans below)."""

    __slots__ = ("_depth",)

    def __init__(self):
        self._depth = 0

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1

    def active(self) -> bool:
        return self._depth > 0


# Whether the plan being prepared now runs once and is dropped (dispatch.plan(one_call=True): a layer streamed from
# RAM plans at each call; the functional kernels.linear / conv2d): the Triton backends then launch through Triton's
# own path and learn no direct launch (triton_launch.Launcher), which only a kept plan's later calls would use.
one_call_plans = PlanningScope()
planning_one_call = one_call_plans.active


# prepare(request, operands) -> run(x, static_scale) -> y: everything that depends only on the weight
# and the signature happens in prepare, once; run does the per-call work.
Prepare = Callable[..., Callable]


@dataclass(frozen=True)
class Implementation:
    name: str
    # Returns None if the backend can run here at all, else the reason it cannot.
    unavailable_reason: Callable[[], Optional[str]]
    # Returns None if this request is supported (and worth it), else the reason it is not.
    rejects: Callable[[Request], Optional[str]]
    prepare: Prepare
    priority: int = 0  # higher wins under AUTO
    # AUTO only: returns a reason when the backend *could* run the request but should not be
    # chosen unasked (e.g. measured slower than the float path). An explicit backend ignores it.
    declines: Optional[Callable[[Request], Optional[str]]] = None
    # Optional fused fc1 -> GELU(tanh) -> fc2 chain for two static W8A8 linears:
    # prepare_mlp(request, fc1 operands, fc2 operands) -> run(x, scale1, scale2).
    prepare_mlp: Optional[Prepare] = None
    ops: tuple[str, ...] = OPS


_REGISTRY: dict[str, Implementation] = {}
_logged: set[str] = set()


def log_once(key: str, message: str, level: int = logging.INFO) -> None:
    if key not in _logged:
        _logged.add(key)
        log.log(level, message)


def register(impl: Implementation) -> Implementation:
    _REGISTRY[impl.name] = impl
    return impl


def get(name: str | Backend) -> Implementation:
    key = Backend(name).value if isinstance(name, Backend) or name in Backend._value2member_map_ else name
    if key not in _REGISTRY:
        raise KeyError(f"Unknown INT8 backend {name!r}. Registered backends: {sorted(_REGISTRY)}. "
                       f"Pick one of these (or 'auto').")
    return _REGISTRY[key]


def registered() -> list[str]:
    return sorted(_REGISTRY)


def _usable(impl: Implementation, req: Request) -> Optional[str]:
    reason = impl.unavailable_reason()
    if reason is None:
        reason = impl.rejects(req)
    if reason is None and req.op not in impl.ops:
        reason = f"no {req.op} kernel"
    return reason


def select(req: Request, backend: str = Backend.AUTO.value) -> Implementation:
    """Pick the implementation for one request (callers cache the result in a plan)."""
    if req.op not in OPS or req.act not in ACT_MODES or req.fmt not in FORMATS or req.goal not in GOALS:
        raise ValueError(f"Unsupported request {req}: op must be one of {OPS}, act one of {ACT_MODES}, "
                         f"fmt one of {FORMATS}, goal one of {GOALS}")
    backend = Backend(backend).value
    if backend != Backend.AUTO.value:
        impl = get(backend)
        reason = _usable(impl, req)
        if reason is None:
            return impl
        fallback = _auto(req)
        log_once(f"explicit:{backend}:{req.op}:{req.act}:{req.device}:{reason}",
                 f"Octet: backend '{backend}' cannot run {req.op}/{req.act} on {req.device} ({reason}); "
                 f"using '{fallback.name}' instead.", logging.WARNING)
        return fallback
    return _auto(req)


def _auto(req: Request) -> Implementation:
    candidates = sorted(_REGISTRY.values(), key=lambda i: -i.priority)
    for impl in candidates:
        reason = _usable(impl, req)
        if reason is None and impl.declines is not None:
            reason = impl.declines(req)
        if reason is None:
            return impl
        if impl.name not in (Backend.TORCH.value, Backend.CPU.value):
            log_once(f"auto:{impl.name}:{req.op}:{req.act}:{req.device}:{reason}",
                     f"Octet: {impl.name} not used for {req.op}/{req.act} on {req.device}: {reason}.")
    raise RuntimeError(f"No INT8 backend can run {req}; registered: {registered()}")
