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

from typing import Optional

import torch

from .. import ops, registry
from ..torch_ref import pair
from . import triton_support

NAME = "triton"
_DTYPES = ("float16", "bfloat16", "float32")

# The dispatcher's cost model, fitted to bench/kernels.py on an H100 80GB HBM3 (torch 2.11,
# Triton 3.6, 2026-11-26; docs/BENCHMARKS.md): a layer costs max(CPU launch cost, GPU time), where
# GPU time = bytes of the extra passes / bandwidth + 2*M*N*K / achieved rate. Eager launch cost
# dominates small layers (Python + Triton launch ~80 us for quantize + GEMM, against ~25 us for
# the float path's dequantize + cuBLAS); the float path pays ~23 bytes per weight element to
# dequantize (int8 -> fp32, scale, cast: three torch passes), the W8A8 path ~6 bytes per activation
# element to quantize (our row kernel runs at about half of bandwidth).
_BANDWIDTH = 3.0e12
_COSTS = {
    # path:        (launch s, bytes per weight elem, bytes per activation elem, MAC/s * 2)
    "float":       (25e-6, 23.0, 0.0, 700e12),
    "w8a8":        (80e-6, 0.0, 6.0, 1100e12),
    "w8a16":       (40e-6, 1.0, 0.0, 400e12),
    "float_conv":  (30e-6, 23.0, 0.0, 350e12),   # cuDNN bf16 NCHW at SDXL shapes
    "w8a8_conv":   (140e-6, 0.0, 6.0, 700e12),   # quantize (2 kernels) + weight reorder + conv
}
# Weight-only through our kernel pays only while the GEMM is bound by reading the weight.
W8A16_MAX_M = 1024


def estimated_seconds(path: str, m: int, n: int, k: int, pixels_x_channels: int | None = None) -> float:
    """Estimated time of one call on the GPU the constants were fitted on (see _COSTS)."""
    launch, w_bytes, a_bytes, rate = _COSTS[path]
    act_elems = pixels_x_channels if pixels_x_channels is not None else m * k
    gpu = (w_bytes * n * k + a_bytes * act_elems) / _BANDWIDTH + 2.0 * m * n * k / rate
    return max(launch, gpu)


def int8_pays(req: registry.Request) -> bool:
    """Whether the Triton INT8 path is estimated faster than the float path for this request.
    Also useful to a quantization policy: where it is False, INT8 buys memory, not speed."""
    m, n, k = max(req.m, 1), max(req.n, 1), max(req.k, 1)
    if req.op == "conv2d":
        if req.act == "none":
            return False
        # k = C*KH*KW; the activation pass touches M*C elements, about M*k/9 for 3x3 convs.
        return estimated_seconds("w8a8_conv", m, n, k, m * max(k // 9, 1)) < estimated_seconds("float_conv", m, n, k)
    if req.act == "none":
        return m <= W8A16_MAX_M and estimated_seconds("w8a16", m, n, k) < estimated_seconds("float", m, n, k)
    return estimated_seconds("w8a8", m, n, k) < estimated_seconds("float", m, n, k)


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
                f"(cost model measured on H100, see docs/BENCHMARKS.md)")
    return None


def rejects(req: registry.Request) -> Optional[str]:
    reason = _device_reason(req)
    if reason is None and req.dtype not in _DTYPES:
        reason = f"activation dtype {req.dtype}"
    if reason is None and req.op == "conv2d" and getattr(req, "groups", 1) != 1:
        reason = f"groups={req.groups} (implicit-GEMM conv handles groups == 1)"
    return reason


def _linear(x, qweight, w_scale, bias, act, smooth, static_scale):
    return ops.linear(x, qweight, w_scale, bias, act, smooth, static_scale)


def _static_mlp(x, fc1, fc2):
    return ops.static_mlp(x, fc1, fc2)


def _pair(v) -> list[int]:
    return list(pair(v))


def _explicit_padding(padding, qweight, dilation) -> list[int]:
    """F.conv2d's 'valid'/'same' as integers ('same' needs odd effective kernels: symmetric)."""
    if padding == "valid":
        return [0, 0]
    if padding == "same":
        dil = _pair(dilation)
        total = [dil[0] * (qweight.shape[2] - 1), dil[1] * (qweight.shape[3] - 1)]
        if total[0] % 2 or total[1] % 2:
            raise ValueError("padding='same' with an even kernel is asymmetric; the INT8 conv needs explicit padding")
        return [total[0] // 2, total[1] // 2]
    return _pair(padding)


def _conv2d(x, qweight, w_scale, bias, stride, padding, dilation, groups, act, smooth, static_scale):
    if groups != 1:
        raise ValueError(f"triton conv2d handles groups == 1, got {groups}")
    return ops.conv2d(x, qweight, w_scale, bias, _pair(stride), _explicit_padding(padding, qweight, dilation),
                           _pair(dilation), act, smooth, static_scale)


IMPLEMENTATION = registry.register(registry.Implementation(
    name=NAME,
    unavailable_reason=triton_support.unavailable_reason,
    rejects=rejects,
    linear=_linear,
    conv2d=_conv2d,
    priority=20,
    declines=declines,
    static_mlp=_static_mlp,
))
