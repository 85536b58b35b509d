"""INT8 compute for Octet: the public ops and the backends behind them.

This package knows nothing of Octet's model code or of ComfyUI; it takes int8 weights, their
per-output-channel scales and float activations, and returns float outputs. ``linear`` and
``conv2d`` below are the only entry points the rest of Octet uses; they build a ``Request`` and
let ``registry.select`` choose the backend.
"""
from __future__ import annotations

import torch

from . import registry, torch_ref
from .registry import Backend, Implementation, Request

__all__ = ["Backend", "Implementation", "Request", "registry", "torch_ref", "linear", "conv2d",
           "quantize_weight", "dequantize_weight"]

quantize_weight = torch_ref.quantize_weight
dequantize_weight = torch_ref.dequantize_weight


def _torch_linear(x, qweight, w_scale, bias, act, smooth, static_scale):
    if act == "none":
        return torch_ref.linear_w8a16(x, qweight, w_scale, bias)
    return torch_ref.linear_w8a8(x, qweight, w_scale, bias, smooth,
                                 static_scale if act == "static" else None)


def _torch_conv2d(x, qweight, w_scale, bias, stride, padding, dilation, groups, act, smooth, static_scale):
    if act == "none":
        return torch_ref.conv2d_w8a16(x, qweight, w_scale, bias, stride, padding, dilation, groups)
    return torch_ref.conv2d_w8a8(x, qweight, w_scale, bias, stride, padding, dilation, groups, smooth,
                                 static_scale if act == "static" else None)


registry.register(Implementation(
    name=Backend.TORCH.value,
    unavailable_reason=lambda: None,
    rejects=lambda req: None,
    linear=_torch_linear,
    conv2d=_torch_conv2d,
    priority=0,
))

# Optional accelerated backends register themselves on import; a missing dependency is
# reported by the backend's own unavailable_reason (logged once by the registry), not here.
from . import backends as _backends  # noqa: E402,F401


def _request(op: str, act: str, x: torch.Tensor, n: int, k: int, m: int, groups: int = 1) -> Request:
    return Request(op=op, act=act, device=x.device.type, dtype=str(x.dtype).replace("torch.", ""), m=m, n=n, k=k,
                   groups=groups)


def linear(x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None, *,
           act: str = "dynamic", smooth: torch.Tensor | None = None, static_scale: torch.Tensor | None = None,
           backend: str = "auto") -> torch.Tensor:
    """y = x @ dequant(qweight).T + bias with INT8 weights (and INT8 activations unless act='none')."""
    if act == "static" and static_scale is None:
        raise ValueError("act='static' needs static_scale (run Calibrate first, or use act='dynamic').")
    m = x.numel() // x.shape[-1] if x.dim() else 0
    impl = registry.select(_request("linear", act, x, qweight.shape[0], qweight.shape[1], m), backend)
    return impl.linear(x, qweight, w_scale, bias, act, smooth, static_scale)


def conv2d(x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None,
           stride=1, padding=0, dilation=1, groups: int = 1, *, act: str = "dynamic",
           smooth: torch.Tensor | None = None, static_scale: torch.Tensor | None = None,
           backend: str = "auto") -> torch.Tensor:
    if act == "static" and static_scale is None:
        raise ValueError("act='static' needs static_scale (run Calibrate first, or use act='dynamic').")
    k = qweight[0].numel()
    m = x.shape[0] * x.shape[-1] * x.shape[-2]
    impl = registry.select(_request("conv2d", act, x, qweight.shape[0], k, m, groups), backend)
    return impl.conv2d(x, qweight, w_scale, bias, stride, padding, dilation, groups, act, smooth, static_scale)
