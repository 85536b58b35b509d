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
  * a measured shape table (``BREAK_EVEN_MNK``): below it, launch overhead and the extra
    activation pass make INT8 slower than bf16 on the GPU, so the float path wins.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import ops, registry
from . import triton_support

NAME = "triton"
_DTYPES = ("float16", "bfloat16", "float32")

# Smallest GEMM work (M*N*K multiply-adds) at which the INT8 path beat bf16 on the GPU, per op
# and activation mode, measured by bench/kernels.py (see docs/BENCHMARKS.md, section Kernels).
# Weight-only (act="none") is limited in M instead: dequantizing inside the GEMM pays while the
# GEMM is bound by reading the weight, and loses to cuBLAS once it is compute-bound.
BREAK_EVEN_MNK = {"linear": 2**27, "conv2d": 2**28}
W8A16_MAX_M = 256


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
    if req.act == "none":
        if req.op == "linear" and req.m > W8A16_MAX_M:
            return (f"weight-only GEMM with M > {W8A16_MAX_M} is compute-bound; cuBLAS on the "
                    f"dequantized weight is faster")
        if req.op == "conv2d":
            return "weight-only conv: cuDNN on the dequantized weight is as fast and needs no INT8 kernel"
        return None
    work = req.m * req.n * req.k
    floor = BREAK_EVEN_MNK[req.op]
    if work < floor:
        # Log per power-of-two bucket, not per shape: one line per size class.
        return f"M*N*K ~2^{max(work, 1).bit_length() - 1} is below the measured INT8 break-even 2^{floor.bit_length() - 1}"
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


def _pair(v) -> list[int]:
    if isinstance(v, int):
        return [v, v]
    v = [int(e) for e in v]
    return v * 2 if len(v) == 1 else v


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
))
