"""``torch.library`` custom ops for the Triton INT8 kernels.

Each op is declared once with a schema and a fake (meta) implementation, so ``torch.compile``
traces one opaque node per quantized layer instead of breaking the graph at a Triton launch,
and ``torch.library.opcheck`` can verify the declaration against the real kernel.

  octet::quantize_rows(x, smooth?, static_scale?) -> (int8 [M, K], fp32 scales [M] or [1])
  octet::int8_linear(x, qweight, w_scale, bias?, act, smooth?, static_scale?) -> x.dtype [..., N]
  octet::int8_conv2d(x, qweight, w_scale, bias?, stride, padding, dilation, act, smooth?,
                     static_scale?) -> x.dtype NCHW
  octet::int8_static_mlp(x, fc1 operands, fc2 operands) -> x.dtype [..., N2]: fc2(gelu_tanh(fc1(x)))

``linear``/``conv2d`` below go through the custom op only while ``torch.compile`` traces; in eager
mode they call the same body directly, because a Python custom op costs tens of microseconds of
dispatcher time per call (measured on H100: it decided whether small layers beat bf16).

The real implementations import the Triton kernel modules on first call, so this module imports
(and the ops exist, for tracing) even where triton is missing; calling one there raises.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from . import torch_ref
from .backends import triton_support

Tensor = torch.Tensor


def _lookup(qualname: str):
    ns, name = qualname.split("::")
    try:
        packet = getattr(getattr(torch.ops, ns), name)
        packet.default  # noqa: B018 - raises if the op was never defined
        return packet
    except (AttributeError, RuntimeError):
        return None


def define_op(qualname: str, fake):
    """``torch.library.custom_op(qualname)`` with ``fake`` as its meta kernel, defined once per process.

    ComfyUI may import this pack a second time under another module name (its loader keys
    modules by folder path); redefining a live op swaps its kernels under references the first
    copy holds, so a second copy reuses the op the first one defined (same code, same schema).
    """
    def wrap(fn):
        existing = _lookup(qualname)
        if existing is not None:
            return existing
        op = torch.library.custom_op(qualname, mutates_args=())(fn)
        op.register_fake(fake)
        return op
    return wrap


def _kernels():
    reason = triton_support.unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"octet Triton kernels cannot run: {reason}")
    from .backends import triton_conv, triton_gemm, triton_quant
    return triton_quant, triton_gemm, triton_conv


# ---- quantize_rows --------------------------------------------------------------------------------

def _quantize_rows_fake(x, smooth, static_scale):
    scales = x.new_empty((1,) if static_scale is not None else (x.shape[0],), dtype=torch.float32)
    return x.new_empty(x.shape, dtype=torch.int8), scales


@define_op("octet::quantize_rows", _quantize_rows_fake)
def quantize_rows(x: Tensor, smooth: Optional[Tensor], static_scale: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    triton_quant, _, _ = _kernels()
    return triton_quant.quantize_rows(x, smooth, static_scale)


# ---- int8_linear ----------------------------------------------------------------------------------

def linear_impl(x: Tensor, qweight: Tensor, w_scale: Tensor, bias: Optional[Tensor], act: str,
                smooth: Optional[Tensor], static_scale: Optional[Tensor]) -> Tensor:
    """The body of octet::int8_linear, callable without the dispatcher (see ``eager``)."""
    triton_quant, triton_gemm, _ = _kernels()
    from .backends import triton_w8a16
    x2d = x.reshape(-1, x.shape[-1])
    if act == "none":
        # Small M: one launch reading the int8 weight as stored; large M: one-pass dequantize + cuBLAS.
        y = triton_w8a16.w8a16_linear(x2d, qweight, w_scale, bias)
    elif act in ("dynamic", "static"):
        if act == "static" and static_scale is None:
            raise ValueError("act='static' needs static_scale")
        # (triton_w8a8_static fuses the static quantization into the GEMM prologue, but on H200 it
        # was slower than this separate pass in CUDA-graph timing at 11 of 12 shapes, 2-6x at the
        # Flux shapes: see docs/BENCHMARKS.md, fused kernels.)
        xq, xs = triton_quant.quantize_rows(x2d.contiguous(), smooth, static_scale if act == "static" else None)
        y = triton_gemm.w8a8_gemm(xq, xs, qweight, w_scale, bias, x.dtype)
    else:
        raise ValueError(f"act must be none|dynamic|static, got {act!r}")
    return y.reshape(*x.shape[:-1], qweight.shape[0])


def _int8_linear_fake(x, qweight, w_scale, bias, act, smooth, static_scale):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


@define_op("octet::int8_linear", _int8_linear_fake)
def int8_linear(x: Tensor, qweight: Tensor, w_scale: Tensor, bias: Optional[Tensor], act: str,
                smooth: Optional[Tensor], static_scale: Optional[Tensor]) -> Tensor:
    return linear_impl(x, qweight, w_scale, bias, act, smooth, static_scale)


# ---- int8_static_mlp -------------------------------------------------------------------------------

def static_mlp_impl(x: Tensor, q1: Tensor, s1: Tensor, b1: Optional[Tensor], sm1: Optional[Tensor], sc1: Tensor,
                    q2: Tensor, s2: Tensor, b2: Optional[Tensor], sm2: Optional[Tensor], sc2: Tensor) -> Tensor:
    """fc2(gelu_tanh(fc1(x))), both static W8A8: three launches (quantize x; fc1 with GELU and
    fc2's quantization in its epilogue; fc2) instead of six, and no float hidden tensor."""
    triton_quant, triton_gemm, _ = _kernels()
    x2d = x.reshape(-1, x.shape[-1]).contiguous()
    xq, xs = triton_quant.quantize_rows(x2d, sm1, sc1)
    hq = triton_gemm.w8a8_gemm(xq, xs, q1, s1, b1, x.dtype, gelu_quant=(sm2, sc2))
    y = triton_gemm.w8a8_gemm(hq, sc2, q2, s2, b2, x.dtype)
    return y.reshape(*x.shape[:-1], q2.shape[0])


def _static_mlp_fake(x, q1, s1, b1, sm1, sc1, q2, s2, b2, sm2, sc2):
    return x.new_empty((*x.shape[:-1], q2.shape[0]))


@define_op("octet::int8_static_mlp", _static_mlp_fake)
def int8_static_mlp(x: Tensor, q1: Tensor, s1: Tensor, b1: Optional[Tensor], sm1: Optional[Tensor], sc1: Tensor,
                    q2: Tensor, s2: Tensor, b2: Optional[Tensor], sm2: Optional[Tensor], sc2: Tensor) -> Tensor:
    return static_mlp_impl(x, q1, s1, b1, sm1, sc1, q2, s2, b2, sm2, sc2)


# ---- int8_conv2d ----------------------------------------------------------------------------------

def _conv_out_format(x: Tensor) -> torch.memory_format:
    # Like F.conv2d: a channels_last input gives a channels_last output.
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def conv2d_impl(x: Tensor, qweight: Tensor, w_scale: Tensor, bias: Optional[Tensor], stride: Sequence[int],
                padding: Sequence[int], dilation: Sequence[int], act: str, smooth: Optional[Tensor],
                static_scale: Optional[Tensor]) -> Tensor:
    """The body of octet::int8_conv2d, callable without the dispatcher (see ``eager``)."""
    _, _, triton_conv = _kernels()
    if act == "none":
        # Weight-only conv: cuDNN on the dequantized weight (see backends/float_fallback.py for why
        # an INT8 kernel does not pay without INT8 activations).
        w = torch_ref.dequantize_weight(qweight, w_scale, x.dtype)
        y = F.conv2d(x, w, None if bias is None else bias.to(x.dtype), tuple(stride), tuple(padding),
                     tuple(dilation))
        return y.contiguous(memory_format=_conv_out_format(x))
    if act not in ("dynamic", "static"):
        raise ValueError(f"act must be none|dynamic|static, got {act!r}")
    if act == "static" and static_scale is None:
        raise ValueError("act='static' needs static_scale")
    return triton_conv.conv2d_w8a8(x, qweight, w_scale, bias, tuple(stride), tuple(padding), tuple(dilation), 1,
                                   smooth, static_scale if act == "static" else None)


def _int8_conv2d_fake(x, qweight, w_scale, bias, stride, padding, dilation, act, smooth, static_scale):
    kh, kw = qweight.shape[2], qweight.shape[3]
    oh = (x.shape[2] + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (x.shape[3] + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return torch.empty((x.shape[0], qweight.shape[0], oh, ow), dtype=x.dtype, device=x.device,
                       memory_format=_conv_out_format(x))


@define_op("octet::int8_conv2d", _int8_conv2d_fake)
def int8_conv2d(x: Tensor, qweight: Tensor, w_scale: Tensor, bias: Optional[Tensor], stride: Sequence[int],
                padding: Sequence[int], dilation: Sequence[int], act: str, smooth: Optional[Tensor],
                static_scale: Optional[Tensor]) -> Tensor:
    return conv2d_impl(x, qweight, w_scale, bias, stride, padding, dilation, act, smooth, static_scale)


# ---- entry points for the backend -----------------------------------------------------------------

def linear(x, qweight, w_scale, bias, act, smooth, static_scale):
    if torch.compiler.is_compiling():
        return int8_linear(x, qweight, w_scale, bias, act, smooth, static_scale)
    return linear_impl(x, qweight, w_scale, bias, act, smooth, static_scale)


def static_mlp(x, fc1, fc2):
    """fc1/fc2: (qweight, w_scale, bias, smooth, static_scale) as torch_ref.static_mlp takes them."""
    if torch.compiler.is_compiling():
        return int8_static_mlp(x, *fc1, *fc2)
    return static_mlp_impl(x, *fc1, *fc2)


def conv2d(x, qweight, w_scale, bias, stride, padding, dilation, act, smooth, static_scale):
    if torch.compiler.is_compiling():
        return int8_conv2d(x, qweight, w_scale, bias, stride, padding, dilation, act, smooth, static_scale)
    return conv2d_impl(x, qweight, w_scale, bias, stride, padding, dilation, act, smooth, static_scale)
