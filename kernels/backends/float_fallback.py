"""The float path: dequantize the INT8 weight once per call and run cuBLAS/cuDNN in x's dtype.

AUTO lands here on a GPU when the INT8 kernels would be slower than plain bf16 for a request
(tiny GEMMs where launch overhead dominates, weight-only layers at large M, GPUs without the
Triton configs): the dispatcher's promise is never to be slower than the float model.
The numbers are *more* accurate than W8A8 (activations stay in float), so this is a fallback for
speed, not an emulation of INT8 error; ``backend="torch"`` is the bit-exact INT8 reference.
On CPU the torch reference is used instead (this path is rejected there), so CPU numerics stay
those of ``torch_ref``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import registry, torch_ref

NAME = registry.Backend.FLOAT.value


def _unsmoothed(x: torch.Tensor, smooth, channel_dim: int) -> torch.Tensor:
    # SmoothQuant folded `smooth` into the weight (W * s); the activation must be divided by it,
    # whether or not it is then quantized.
    if smooth is None:
        return x
    shape = [1] * x.dim()
    shape[channel_dim] = -1
    return (x.float() / smooth.float().reshape(shape)).to(x.dtype)


def _linear(x, qweight, w_scale, bias, act, smooth, static_scale):
    x = _unsmoothed(x, smooth, -1)
    w = torch_ref.dequantize_weight(qweight, w_scale, x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


def _conv2d(x, qweight, w_scale, bias, stride, padding, dilation, groups, act, smooth, static_scale):
    x = _unsmoothed(x, smooth, 1)
    w = torch_ref.dequantize_weight(qweight, w_scale, x.dtype)
    return F.conv2d(x, w, None if bias is None else bias.to(x.dtype), stride, padding, dilation, groups)


def _rejects(req: registry.Request):
    if req.device != "cuda":
        return "the float path only pays on a GPU; the CPU uses the torch reference"
    return None


IMPLEMENTATION = registry.register(registry.Implementation(
    name=NAME,
    unavailable_reason=lambda: None,
    rejects=_rejects,
    linear=_linear,
    conv2d=_conv2d,
    priority=10,
))
