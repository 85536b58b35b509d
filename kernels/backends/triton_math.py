"""The element-wise math every Triton kernel shares: the INT8 grid, the scale rule, GELU (tanh).

Each is torch_ref's definition written for ``@triton.jit`` code, once; the quantization kernels
(triton_quant), the GEMM epilogue (triton_gemm) and the static-prologue GEMM (triton_w8a8_static)
call these. The numbers are literals because a jit function reads only ``tl.constexpr`` globals:
127.0 is ``torch_ref.QMAX`` and 1e-12 ``torch_ref.MIN_SCALE``; tests compare the kernels with
torch_ref bit for bit, so a change there that is not made here fails them.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def round_half_even(v):
    # Round half to even with the fp32 magic number: adding and subtracting 1.5 * 2**23 rounds to the
    # nearest even integer for |v| < 2**22. (libdevice.rint would do on the GPU, but the CPU
    # interpreter does not implement it, and CI runs these very kernels.)
    return (v + 12582912.0) - 12582912.0


@triton.jit
def round_to_grid(v):
    # Clamp to [-QMAX, QMAX], then round half to even: clamping first makes round_half_even's range
    # hold and gives torch_ref's round-then-clamp result.
    return round_half_even(tl.minimum(tl.maximum(v, -127.0), 127.0))


@triton.jit
def round_to_int8(v):
    return round_to_grid(v).to(tl.int8)


@triton.jit
def codes_by_reciprocal(v, scale):
    # Dynamic int8 codes of v (|v| <= the absmax its scale came from) as v times the scale's reciprocal, rounded
    # half to even, unclamped: no IEEE division per element (its check and slow-path branch) and no clamp, which
    # were a third or more of the row quantizers' instructions (bench/sass_count.py). A code can differ from
    # round_to_int8(v / scale)'s by one where v / scale is within ~2e-5 of a half; |v| <= absmax keeps it within
    # 127. ``scale`` broadcasts against v (a row's scalar, or [rows, 1]).
    return round_half_even(v * tl.div_rn(1.0, scale)).to(tl.int8)


@triton.jit
def scale_from_absmax(absmax, SCALE_BY_RECIPROCAL: tl.constexpr):
    # torch_ref computes absmax / 127. PyTorch's CUDA kernels divide by a scalar as a multiply by
    # its fp32 reciprocal, its CPU kernels divide; we follow the device so that the scales, and
    # hence the int8 values, are bit-identical to the reference wherever it runs.
    if SCALE_BY_RECIPROCAL:
        s = absmax * (1.0 / 127.0)
    else:
        s = tl.div_rn(absmax, 127.0)
    return tl.maximum(s, 1e-12)


@triton.jit
def gelu_tanh(y):
    # 0.5 y (1 + tanh(u)) with tanh(u) = 1 - 2 / (1 + exp(2u)): needs only exp, which the CPU
    # interpreter has too. tanh(15) is 1 in fp32; the clamp keeps exp finite.
    u = tl.minimum(0.7978845608028654 * (y + 0.044715 * y * y * y), 15.0)
    return 0.5 * y * (2.0 - 2.0 / (1.0 + tl.exp(2.0 * u)))
