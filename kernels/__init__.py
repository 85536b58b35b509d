"""INT8 compute for Octet: the public ops and the backends behind them.

This package knows nothing of Octet's model code or of ComfyUI; it takes int8 weights, their
per-output-channel scales and float activations, and returns float outputs. ``linear`` and
``conv2d`` below are the only entry points the rest of Octet uses; they build a ``Request`` and
let ``registry.select`` choose the backend.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import ops, registry, torch_ref
from .registry import Backend, Implementation, Request

__all__ = ["Backend", "Implementation", "Request", "registry", "torch_ref", "linear", "conv2d", "static_mlp",
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
    static_mlp=torch_ref.static_mlp,
))

# Optional accelerated backends register themselves on import; a missing dependency is
# reported by the backend's own unavailable_reason (logged once by the registry), not here.
from . import backends as _backends  # noqa: E402,F401


def _request(op: str, act: str, x: torch.Tensor, n: int, k: int, m: int, groups: int = 1) -> Request:
    return Request(op=op, act=act, device=x.device.type, dtype=str(x.dtype).replace("torch.", ""), m=m, n=n, k=k,
                   groups=groups)


def _dispatch_linear(x, qweight, w_scale, bias, act, smooth, static_scale, backend):
    m = x.numel() // x.shape[-1] if x.dim() else 0
    impl = registry.select(_request("linear", act, x, qweight.shape[0], qweight.shape[1], m), backend)
    return impl.linear(x, qweight, w_scale, bias, act, smooth, static_scale)


def _dispatch_conv2d(x, qweight, w_scale, bias, stride, padding, dilation, groups, act, smooth, static_scale,
                     backend):
    k = qweight[0].numel()
    m = x.shape[0] * x.shape[-1] * x.shape[-2]
    impl = registry.select(_request("conv2d", act, x, qweight.shape[0], k, m, groups), backend)
    return impl.conv2d(x, qweight, w_scale, bias, stride, padding, dilation, groups, act, smooth, static_scale)


def _dispatch_static_mlp(x, fc1, fc2, backend):
    m = x.numel() // x.shape[-1] if x.dim() else 0
    impl1 = registry.select(_request("linear", "static", x, fc1[0].shape[0], fc1[0].shape[1], m), backend)
    impl2 = registry.select(_request("linear", "static", x, fc2[0].shape[0], fc2[0].shape[1], m), backend)
    if impl1 is impl2 and impl1.static_mlp is not None:
        return impl1.static_mlp(x, fc1, fc2)
    # The two layers are worth different backends (e.g. a small fc2 goes to the float path): no
    # chain to fuse, each layer runs where the dispatcher puts it.
    h = impl1.linear(x, fc1[0], fc1[1], fc1[2], "static", fc1[3], fc1[4])
    h = torch.nn.functional.gelu(h, approximate="tanh")
    return impl2.linear(h, fc2[0], fc2[1], fc2[2], "static", fc2[3], fc2[4])


# Under torch.compile every quantized layer is one opaque custom op whose body is the eager
# dispatch above: the backend choice (cached, logged) stays out of the traced graph, so the
# quantized layers cause no graph break, and CUDA graphs (mode="reduce-overhead") capture the
# kernels the op launches.
def _linear_fake(x, qweight, w_scale, bias, act, smooth, static_scale, backend):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


@ops.define_op("octet::linear", _linear_fake)
def _linear_op(x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor],
               act: str, smooth: Optional[torch.Tensor], static_scale: Optional[torch.Tensor],
               backend: str) -> torch.Tensor:
    return _dispatch_linear(x, qweight, w_scale, bias, act, smooth, static_scale, backend)


def _conv2d_fake(x, qweight, w_scale, bias, stride, padding, dilation, groups, act, smooth, static_scale, backend):
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = qweight.shape[2:], stride, padding, dilation
    oh = (x.shape[2] + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (x.shape[3] + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    return x.new_empty((x.shape[0], qweight.shape[0], oh, ow))


@ops.define_op("octet::conv2d", _conv2d_fake)
def _conv2d_op(x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor],
               stride: list[int], padding: list[int], dilation: list[int], groups: int, act: str,
               smooth: Optional[torch.Tensor], static_scale: Optional[torch.Tensor], backend: str) -> torch.Tensor:
    # The fake promises a contiguous NCHW result; backends may return other layouts.
    return _dispatch_conv2d(x, qweight, w_scale, bias, stride, padding, dilation, groups, act, smooth,
                            static_scale, backend).contiguous()


def _static_mlp_fake(x, q1, s1, b1, sm1, sc1, q2, s2, b2, sm2, sc2, backend):
    return x.new_empty((*x.shape[:-1], q2.shape[0]))


@ops.define_op("octet::static_mlp", _static_mlp_fake)
def _static_mlp_op(x: torch.Tensor, q1: torch.Tensor, s1: torch.Tensor, b1: Optional[torch.Tensor],
                   sm1: Optional[torch.Tensor], sc1: torch.Tensor, q2: torch.Tensor, s2: torch.Tensor,
                   b2: Optional[torch.Tensor], sm2: Optional[torch.Tensor], sc2: torch.Tensor,
                   backend: str) -> torch.Tensor:
    return _dispatch_static_mlp(x, (q1, s1, b1, sm1, sc1), (q2, s2, b2, sm2, sc2), backend)


def linear(x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None, *,
           act: str = "dynamic", smooth: torch.Tensor | None = None, static_scale: torch.Tensor | None = None,
           backend: str = "auto") -> torch.Tensor:
    """y = x @ dequant(qweight).T + bias with INT8 weights (and INT8 activations unless act='none')."""
    if act == "static" and static_scale is None:
        raise ValueError("act='static' needs static_scale (run Calibrate first, or use act='dynamic').")
    if torch.compiler.is_compiling():
        return _linear_op(x, qweight, w_scale, bias, act, smooth, static_scale, backend)
    return _dispatch_linear(x, qweight, w_scale, bias, act, smooth, static_scale, backend)


def static_mlp(x: torch.Tensor, fc1: tuple, fc2: tuple, *, backend: str = "auto") -> torch.Tensor:
    """fc2(gelu_tanh(fc1(x))) for two static W8A8 linears, each given as
    (qweight, w_scale, bias, smooth, static_scale). Where one backend takes both layers and has a
    fused chain (Triton: GELU and fc2's input quantization in fc1's epilogue, int8 hidden tensor),
    it runs fused; otherwise as two linear calls."""
    for name, fc in (("fc1", fc1), ("fc2", fc2)):
        if len(fc) != 5 or fc[4] is None:
            raise ValueError(f"static_mlp: {name} must be (qweight, w_scale, bias, smooth, static_scale) "
                             f"with a static scale (run Calibrate first)")
    if torch.compiler.is_compiling():
        return _static_mlp_op(x, *fc1, *fc2, backend)
    return _dispatch_static_mlp(x, fc1, fc2, backend)


def conv2d(x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None,
           stride=1, padding=0, dilation=1, groups: int = 1, *, act: str = "dynamic",
           smooth: torch.Tensor | None = None, static_scale: torch.Tensor | None = None,
           backend: str = "auto") -> torch.Tensor:
    if act == "static" and static_scale is None:
        raise ValueError("act='static' needs static_scale (run Calibrate first, or use act='dynamic').")
    if torch.compiler.is_compiling() and not isinstance(padding, str):
        stride, padding, dilation = (list(torch_ref.pair(v)) for v in (stride, padding, dilation))
        return _conv2d_op(x, qweight, w_scale, bias, stride, padding, dilation, groups, act, smooth, static_scale,
                          backend)
    return _dispatch_conv2d(x, qweight, w_scale, bias, stride, padding, dilation, groups, act, smooth,
                            static_scale, backend)
