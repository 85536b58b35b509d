"""INT8 Conv2d as an implicit GEMM in Triton (groups == 1).

Layout: activations are quantized straight into NHWC int8 (``triton_quant``), so a GEMM row is
one output pixel and a K step reads BLOCK_K consecutive input channels of one (kh, kw) tap:
contiguous int8 loads, no im2col buffer. The weight is reordered once per call to
[OC, KH, KW, C] (K-major, like a linear weight). GEMM sizes: M = N*OH*OW, N = OC, K = KH*KW*C.
The K loop runs over (tap, channel block) pairs flattened into one loop, which Triton
software-pipelines like a plain GEMM; pixels whose tap falls in the padding load zeros (exact:
int8 zero is real zero for symmetric quantization). A 1x1/stride-1/no-padding conv skips all
tap arithmetic and is a plain GEMM over the NHWC pixels.

The epilogue is the linear one: acc * a_scale[sample] * w_scale[oc] (+ bias), written straight
into the output's memory layout (NCHW contiguous, or channels_last when the input was).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from triton.tools.tensor_descriptor import TensorDescriptor

from ..operands import ConvGeometry, pair
from . import triton_launch, triton_support
from .triton_gemm import _grouped_tile, m_bucket
from .triton_quant import SampleQuantizer

_MAX_INT32 = 2**31 - 1


def _set_weight_block(nargs):
    """Autotune pre-hook: the weight's TMA box must match the config's tile."""
    if isinstance(nargs["w_ptr"], TensorDescriptor):
        nargs["w_ptr"].block_shape = [nargs["BLOCK_N"], nargs["BLOCK_K"]]


def _cfg(bm, bn, bk, stages, warps, group_m=8):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m},
                         num_stages=stages, num_warps=warps, pre_hook=_set_weight_block)


def conv_configs() -> list:
    """Tiles for the implicit GEMM; K steps of 64 suit C = 320/640/1280 (multiples of 64)."""
    if triton_support.interpreting():
        return [_cfg(32, 32, 64, 1, 4, group_m=2)]
    if triton_support.capability()[0] >= 9:
        return [
            _cfg(128, 128, 64, 4, 8),
            _cfg(128, 256, 64, 3, 8),
            _cfg(256, 128, 64, 3, 8),
            _cfg(128, 128, 128, 3, 8),
            _cfg(128, 128, 64, 4, 4),
            _cfg(64, 128, 64, 4, 4),
            _cfg(128, 64, 64, 4, 4),
            _cfg(64, 64, 64, 4, 4),
        ]
    return [
        _cfg(128, 128, 64, 3, 8),
        _cfg(128, 256, 64, 3, 8),
        _cfg(128, 128, 64, 4, 4),
        _cfg(64, 128, 64, 4, 4),
        _cfg(128, 64, 64, 4, 4),
        _cfg(64, 64, 64, 4, 4),
    ]


def _prune(configs, named_args, **kwargs):
    # Tiles no taller than M; with a TMA weight, K steps that never straddle two taps (C % BK == 0).
    m, c = named_args["M"], named_args["C"]
    tma = kwargs.get("W_TMA", named_args.get("W_TMA", False))
    kept = [cfg for cfg in configs if cfg.kwargs["BLOCK_M"] <= max(16, triton_support.next_power_of_2(m))
            and (not tma or c % cfg.kwargs["BLOCK_K"] == 0)]
    return triton_support.survivors(configs, kept)


@triton.autotune(configs=conv_configs(),
                 do_bench=triton_support.tuning_bench,
                 key=["M_BUCKET", "OC", "C", "KH", "KW", "POINTWISE", "W_TMA"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _conv_kernel(x_ptr, w_ptr, y_ptr, a_scale_ptr, w_scale_ptr, bias_ptr,
                 M, M_BUCKET, H, W, C, OH, OW, OC,
                 stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                 y_stride_n, y_stride_c, y_stride_p, a_scale_stride,
                 KH: tl.constexpr, KW: tl.constexpr, POINTWISE: tl.constexpr, HAS_BIAS: tl.constexpr,
                 W_TMA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 GROUP_M: tl.constexpr):
    pid_m, pid_n = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(OC, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)     # output pixel (n, oh, ow) flattened
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)     # output channel
    offs_k = tl.arange(0, BLOCK_K)
    m_safe = offs_m % M
    n_safe = offs_n % OC
    ohw = OH * OW
    sample = m_safe // ohw
    pix = m_safe % ohw
    k_total = KH * KW * C
    if not W_TMA:
        w_rows = w_ptr + n_safe[None, :] * k_total
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    if POINTWISE:
        # 1x1, stride 1, no padding: pixel m of the output is pixel m of the input.
        a_ptrs = x_ptr + m_safe[:, None] * C + offs_k[None, :]
        for k0 in range(0, C, BLOCK_K):
            a = tl.load(a_ptrs, mask=offs_k[None, :] < C - k0, other=0)
            if W_TMA:
                b = w_ptr.load([pid_n * BLOCK_N, k0]).T
            else:
                b = tl.load(w_rows + k0 + offs_k[:, None], mask=offs_k[:, None] < C - k0, other=0)
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)
            a_ptrs += BLOCK_K
    else:
        oh = pix // OW
        ow = pix % OW
        ih0 = oh * stride_h - pad_h
        iw0 = ow * stride_w - pad_w
        x_sample = x_ptr + sample * (H * W * C)
        c_blocks = tl.cdiv(C, BLOCK_K)
        for i in range(0, KH * KW * c_blocks):
            tap = i // c_blocks
            c0 = (i - tap * c_blocks) * BLOCK_K
            kh = tap // KW
            kw = tap - kh * KW
            ih = ih0 + kh * dil_h
            iw = iw0 + kw * dil_w
            inside = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            c_ok = offs_k < C - c0
            a = tl.load(x_sample[:, None] + ((ih * W + iw) * C + c0)[:, None] + offs_k[None, :],
                        mask=inside[:, None] & c_ok[None, :], other=0)
            if W_TMA:
                b = w_ptr.load([pid_n * BLOCK_N, tap * C + c0]).T
            else:
                b = tl.load(w_rows + (tap * C + c0) + offs_k[:, None], mask=c_ok[:, None], other=0)
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)
    mask_m = offs_m < M
    mask_n = offs_n < OC
    a_scale = tl.load(a_scale_ptr + sample * a_scale_stride)
    w_scale = tl.load(w_scale_ptr + offs_n, mask=mask_n, other=0.0)
    y = acc.to(tl.float32) * a_scale[:, None] * w_scale[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + (sample * y_stride_n + pix * y_stride_p)[:, None] + (offs_n * y_stride_c)[None, :]
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])



def unsupported_reason(groups: int, padding) -> str | None:
    if groups != 1:
        return f"groups={groups} (the INT8 implicit-GEMM conv handles groups == 1 only)"
    if isinstance(padding, str):
        return f"padding={padding!r} (pass explicit integers)"
    return None


class ConvW8A8:
    """One INT8 conv layer's weight side prepared once: checks, the [OC, KH, KW, C] weight order, fp32
    scales, the per-sample quantizer and the conv kernel's launcher (triton_launch)."""

    def __init__(self, qweight: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                 stride, padding, dilation, groups: int, smooth: torch.Tensor | None,
                 weight_khwc: torch.Tensor | None = None):
        reason = unsupported_reason(groups, padding)
        if reason is not None:
            raise ValueError(f"triton conv2d: unsupported {reason}")
        if qweight.dim() != 4 or qweight.dtype != torch.int8:
            raise ValueError(f"conv2d wants an int8 weight [OC, C, KH, KW], got {qweight.dtype} "
                             f"{tuple(qweight.shape)}")
        self.oc, self.c, self.kh, self.kw = qweight.shape
        if w_scale.numel() != self.oc or (bias is not None and bias.numel() != self.oc):
            raise ValueError(f"w_scale/bias must have OC={self.oc} entries")
        self.stride, self.padding, self.dilation = pair(stride), pair(padding), pair(dilation)
        self.qweight = qweight
        # [OC, KH, KW, C]: K-major rows. Plans pass it prepared once (weight_khwc); one-shot calls reorder here.
        self.wq = qweight.permute(0, 2, 3, 1).contiguous() if weight_khwc is None else weight_khwc
        self.w_scale = w_scale.reshape(-1).to(device=qweight.device, dtype=torch.float32).contiguous()
        self.bias = bias
        self.quantizer = SampleQuantizer(self.c, smooth)
        # The weight through TMA on Hopper (bulk copies, zero-filled past OC) when C is a multiple of 64,
        # so a K step never straddles two taps; the activations are a gather, loaded by pointer.
        self.w_tma = self.c % 64 == 0 and (triton_support.is_hopper() or triton_support.interpreting())
        self.launcher = triton_launch.Launcher(_conv_kernel, "conv2d_w8a8")
        self.weight_descs = triton_launch.WeightDescriptors(self.wq.view(self.oc, self.kh * self.kw * self.c)) \
            if self.w_tma else None
        self._calls = triton_launch.BoundCalls()   # key -> bound call, or False (``run``)

    def __call__(self, x: torch.Tensor, static_scale: torch.Tensor | None = None) -> torch.Tensor:
        """NCHW (or channels_last) float in, same layout out, per-sample dynamic (or static) scale. From the second
        call at an input's (shape, dtype, alignment) a bound call (three C launches with their grids and fixed
        arguments worked out once; triton_groupnorm.GroupNorm says why: host time of an eager UNet step)."""
        key = (x.shape, x.dtype, x.is_contiguous(), x.data_ptr() % 16 == 0,
               None if static_scale is None else (static_scale.dtype, static_scale.data_ptr() % 16 == 0))
        return self._calls.call(key, self.run, self._bind, (x, static_scale))

    def _geometry(self, shape: tuple, y_strides: tuple | None = None) -> tuple:
        """(output height, width, M, the kernel's integer arguments) for an input of ``shape`` and an output of
        ``y_strides`` (default: contiguous NCHW)."""
        nb, c, h, w = shape
        stride, padding, dilation = self.stride, self.padding, self.dilation
        oh, ow = ConvGeometry.of(stride, padding, dilation).output_size(h, w, self.kh, self.kw)
        m = nb * oh * ow
        if y_strides is None:
            y_strides = (self.oc * oh * ow, oh * ow, ow, 1)
        per_sample = 1 if nb > 1 else 0    # one scale per sample (a static one expanded to N)
        ints = (m, m_bucket(m), h, w, c, oh, ow, self.oc, stride[0], stride[1], padding[0], padding[1],
                dilation[0], dilation[1], y_strides[0], y_strides[1], y_strides[3], per_sample)
        return oh, ow, m, ints

    def _flags(self) -> dict:
        pointwise = self.kh == 1 and self.kw == 1 and self.stride == (1, 1) and self.padding == (0, 0)
        return dict(KH=self.kh, KW=self.kw, POINTWISE=pointwise, HAS_BIAS=self.bias is not None, W_TMA=self.w_tma)

    def run(self, x: torch.Tensor, static_scale: torch.Tensor | None = None) -> torch.Tensor:
        """The general path: checks, the quantizer's launches and the conv's through triton_launch."""
        if x.dim() != 4:
            raise ValueError(f"conv2d wants x NCHW and int8 weight [OC, C, KH, KW], got {tuple(x.shape)} "
                             f"and {self.qweight.dtype} {tuple(self.qweight.shape)}")
        nb, c, h, w = x.shape
        oc, kh, kw = self.oc, self.kh, self.kw
        if c != self.c:
            raise ValueError(f"weight expects {self.c} input channels, x has {c}")
        oh, ow = ConvGeometry.of(self.stride, self.padding, self.dilation).output_size(h, w, kh, kw)
        if oh <= 0 or ow <= 0:
            raise ValueError(f"conv output would be empty: input {h}x{w}, kernel {kh}x{kw}, padding {self.padding}")
        if max(x.numel(), nb * oc * oh * ow, self.qweight.numel()) > _MAX_INT32:
            raise ValueError("conv2d exceeds 32-bit indexing; split the batch")
        channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        xq, a_scale = self.quantizer(x, static_scale)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        y = torch.empty((nb, oc, oh, ow), dtype=x.dtype, device=x.device, memory_format=fmt)
        _, _, m, ints = self._geometry(x.shape, y.stride())
        ws = self.w_scale if self.w_scale.device == x.device else self.w_scale.to(x.device)
        bias_arg = self.bias if self.bias is not None else ws

        def grid(meta):
            return (triton_support.cdiv(m, meta["BLOCK_M"]) * triton_support.cdiv(oc, meta["BLOCK_N"]),)
        key = (x.dtype, m_bucket(m)) + triton_launch.facts(xq, y, a_scale, *ints)
        weight = self.weight_descs.get if self.w_tma else lambda meta: self.wq
        self.launcher(key, grid, lambda meta: (xq, weight(meta), y, a_scale, ws, bias_arg) + ints, self._flags())
        return y

    def _bind(self, key, x: torch.Tensor, static_scale) -> None:
        """After ``run`` at a new key: the bound call there for a contiguous NCHW input (a static scale: fp32 [1]),
        if the quantizer's and the conv's launches were learned with C launchers on the current device."""
        if not self._calls.open(key) or not x.is_contiguous() or (
                static_scale is not None and (static_scale.dtype != torch.float32 or static_scale.numel() != 1)):
            return
        shape, dtype, x_aligned, static = x.shape, x.dtype, key[3], static_scale is not None
        quantize = self.quantizer.bound(shape, dtype, x_aligned, static, static and key[4][1])
        oh, ow, m, ints = self._geometry(shape)
        y_shape = (shape[0], self.oc, oh, ow)      # contiguous NCHW, as run() makes it for this input
        # Fresh allocations start 16-byte aligned (codes, output); the scales as the quantizer hands them over.
        a_aligned = True if not static else (key[4][1] or shape[0] > 1)
        record = self.launcher.learned((dtype, m_bucket(m), True, True, a_aligned) + triton_launch.facts(*ints))
        device = self.launcher.current_device() if record is not None else None
        if quantize is None or record is None or device != x.get_device() or self.w_scale.device != x.device:
            return
        gx = (triton_support.cdiv(m, record.meta["BLOCK_M"]) * triton_support.cdiv(self.oc, record.meta["BLOCK_N"]),)
        weight = self.weight_descs.get(record.meta) if self.w_tma else self.wq
        ws = self.w_scale
        bias_arg = self.bias if self.bias is not None else ws
        c_launch, current, stream_of, where = record.c_launch, self.launcher.current_device, self.launcher.stream, \
            x.device

        def call(x, static_scale):
            if current() != device:   # compiled kernels belong to the device they were made on
                return None
            stream = stream_of(device)
            xq, a_scale = quantize(stream, x, static_scale)
            y = torch.empty(y_shape, dtype=dtype, device=where)
            c_launch(gx[0], 1, 1, stream, (xq, weight, y, a_scale, ws, bias_arg) + ints)
            return y
        self._calls[key] = call


def conv2d_w8a8(x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                stride, padding, dilation, groups: int, smooth: torch.Tensor | None,
                static_scale: torch.Tensor | None, weight_khwc: torch.Tensor | None = None) -> torch.Tensor:
    """INT8 conv with per-sample dynamic (or static) activation scale; NCHW in, NCHW out. One-shot;
    conv plans keep a ``ConvW8A8``."""
    return ConvW8A8(qweight, w_scale, bias, stride, padding, dilation, groups, smooth, weight_khwc)(x, static_scale)
