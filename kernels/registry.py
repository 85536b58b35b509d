"""One registry of INT8 backends and the one place that picks among them.

Every backend registers a frozen ``Implementation`` record. ``select`` chooses per call from the
request (op, activation mode, device, shape) and the user's explicit wish; whenever the choice
differs from what was asked, or a faster path is unavailable, it logs that once per reason, so
fallbacks are never silent and never spam the console.
"""
from __future__ import annotations

import enum
import functools
import logging
from dataclasses import dataclass
from typing import Callable, Optional

log = logging.getLogger("octet.kernels")

ACT_MODES = ("none", "dynamic", "static")
OPS = ("linear", "conv2d")


class Backend(str, enum.Enum):
    AUTO = "auto"
    TRITON = "triton"
    BNB = "bitsandbytes"
    TORCH = "torch"
    FLOAT = "float"    # dequantized weight + cuBLAS/cuDNN: AUTO's GPU fallback where INT8 loses


@dataclass(frozen=True)
class Request:
    """What one quantized layer asks for; hashable so selection can be cached."""
    op: str            # "linear" | "conv2d"
    act: str           # "none" (weight-only) | "dynamic" | "static"
    device: str        # torch device type: "cpu", "cuda", ...
    dtype: str         # activation dtype name, e.g. "bfloat16"
    m: int = 0         # tokens (linear) or output pixels x batch (conv); 0 = unknown
    n: int = 0
    k: int = 0
    groups: int = 1    # conv2d only: backends differ in which groupings they implement


@dataclass(frozen=True)
class Implementation:
    name: str
    # Returns None if the backend can run here at all, else the reason it cannot.
    unavailable_reason: Callable[[], Optional[str]]
    # Returns None if this request is supported (and worth it), else the reason it is not.
    rejects: Callable[[Request], Optional[str]]
    linear: Callable
    conv2d: Optional[Callable] = None
    priority: int = 0  # higher wins under AUTO
    # AUTO only: returns a reason when the backend *could* run the request but should not be
    # chosen unasked (e.g. measured slower than the float path). An explicit backend ignores it.
    declines: Optional[Callable[[Request], Optional[str]]] = None
    # Optional fused fc1 -> GELU(tanh) -> fc2 chain for two static W8A8 linears (torch_ref.static_mlp
    # defines it); without one, the chain runs as two linear calls.
    static_mlp: Optional[Callable] = None


_REGISTRY: dict[str, Implementation] = {}
_logged: set[str] = set()


def log_once(key: str, message: str, level: int = logging.INFO) -> None:
    if key not in _logged:
        _logged.add(key)
        log.log(level, message)


def register(impl: Implementation) -> Implementation:
    _REGISTRY[impl.name] = impl
    select.cache_clear()
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
    if reason is None and req.op == "conv2d" and impl.conv2d is None:
        reason = "no conv2d kernel"
    return reason


@functools.lru_cache(maxsize=4096)
def select(req: Request, backend: str = Backend.AUTO.value) -> Implementation:
    """Pick the implementation for one request. Cached: layers call this on every forward."""
    if req.op not in OPS or req.act not in ACT_MODES:
        raise ValueError(f"Unsupported request {req}: op must be one of {OPS}, act one of {ACT_MODES}")
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
        if impl.name != Backend.TORCH.value:
            log_once(f"auto:{impl.name}:{req.op}:{req.act}:{req.device}:{reason}",
                     f"Octet: {impl.name} not used for {req.op}/{req.act} on {req.device}: {reason}.")
    raise RuntimeError(f"No INT8 backend can run {req}; registered: {registered()}")
