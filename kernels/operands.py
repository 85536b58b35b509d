"""The weight side of one INT8 layer, as every backend takes it.

Before this record existed, ``(qweight, w_scale, bias, smooth, ...)`` travelled positionally from the
modules through the dispatcher into each backend (the static MLP chain took eleven arguments). Now a
layer hands over one ``Int8Operands`` and a backend's ``prepare`` turns it into a run function once
per input signature; whatever a backend derives from the weight (a transposed copy, a float copy for
the speed goal, a TMA descriptor) is kept in ``memo`` so all plans of the layer share it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from . import graph_pool

Tensor = torch.Tensor


def pair(v) -> tuple[int, int]:
    """A conv stride/padding/dilation as two ints: 3, (3,) and (3, 3) all give (3, 3)."""
    if isinstance(v, int):
        return (v, v)
    v = tuple(int(e) for e in v)
    return (v[0], v[0]) if len(v) == 1 else (v[0], v[1])


@dataclass(frozen=True)
class ConvGeometry:
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] | str = (0, 0)   # or F.conv2d's 'same' / 'valid'
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1

    @staticmethod
    def of(stride=1, padding=0, dilation=1, groups=1) -> "ConvGeometry":
        return ConvGeometry(pair(stride), padding if isinstance(padding, str) else pair(padding), pair(dilation),
                            int(groups))

    def explicit_padding(self, kh: int, kw: int) -> tuple[int, int]:
        """'valid'/'same' as integers ('same' needs an odd effective kernel to be symmetric)."""
        if self.padding == "valid":
            return (0, 0)
        if self.padding == "same":
            total = (self.dilation[0] * (kh - 1), self.dilation[1] * (kw - 1))
            if total[0] % 2 or total[1] % 2:
                raise ValueError("padding='same' with an even kernel is asymmetric; the INT8 conv needs explicit "
                                 "padding")
            return (total[0] // 2, total[1] // 2)
        return self.padding

    def output_size(self, h: int, w: int, kh: int, kw: int) -> tuple[int, int]:
        """The one copy of the convolution output-size formula."""
        (sh, sw), (ph, pw), (dh, dw) = self.stride, self.explicit_padding(kh, kw), self.dilation
        return (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1

    def args(self) -> tuple:
        """(stride, padding, dilation, groups) as F.conv2d takes them."""
        return self.stride, self.padding, self.dilation, self.groups


@dataclass(eq=False)
class Int8Operands:
    """int8 weight [N, K] / [O, C/groups, kh, kw], fp32 per-output-channel scale [N], optional bias,
    optional SmoothQuant divisor [K] (activations are divided by it; the weight was multiplied)."""
    qweight: Tensor
    scale: Tensor
    bias: Optional[Tensor] = None
    smooth: Optional[Tensor] = None
    conv: Optional[ConvGeometry] = None
    memo: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        return self.qweight.shape[0]

    @property
    def k(self) -> int:
        return self.qweight[0].numel() if self.qweight.dim() else 0

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    @staticmethod
    def of(qweight: Tensor, scale: Tensor, bias: Optional[Tensor] = None, smooth: Optional[Tensor] = None,
           conv: Optional[ConvGeometry] = None, device=None, copy_on=None) -> "Int8Operands":
        """Normalised operands on ``device`` (default: the weight's): scale and smooth fp32 vectors.

        ``copy_on``: a function returning a context (a side stream's) to issue the copies in; the memory is still
        allocated outside it, on the current stream (octet/stream_ahead.py: a streamed layer's weight copied ahead
        of its call is allocated on the compute stream that uses and frees it)."""
        device = torch.device(qweight.device if device is None else device)
        if copy_on is None:
            # To a GPU, non_blocking: from pinned RAM (a layer streamed per call) the copy overlaps the host's work;
            # from pageable RAM torch copies synchronously anyway. Never to the CPU: it would read unfinished copies.
            nb = device.type == "cuda"

            def moved(t: Tensor, dtype=None) -> Tensor:
                return t.to(device=device, dtype=dtype, non_blocking=nb)
        else:
            def moved(t: Tensor, dtype=None) -> Tensor:     # as Tensor.to, each copy issued inside copy_on()
                dtype = t.dtype if dtype is None else dtype
                if t.device == device and t.dtype == dtype:
                    return t
                out = torch.empty(t.shape, dtype=dtype, device=device)
                with copy_on():
                    out.copy_(t, non_blocking=True)
                return out
        vec = lambda t: None if t is None else moved(t.reshape(-1), torch.float32).contiguous()  # noqa: E731
        return Int8Operands(moved(qweight).contiguous(), vec(scale), None if bias is None else moved(bias),
                            vec(smooth), conv)

    def free_copies(self, *keep: Tensor) -> None:
        """Give back now the memory of the tensors ``of`` copied for this operand set and of those derived from
        them (not of ``keep``, the layer's own tensors, or views of them). For a layer streamed per call
        (octet/modules.py): its copies are for that call only, and their memory must come back when the call
        returns even where a reference to them outlives it. Flux-dev on an H200, 2026-12-04: with 12 GiB free the
        copies of all 8 streamed layers (0.49 GiB), with 8 GiB free those of 8 of the 79, were still allocated at
        the out-of-memory error: each call's plan and the bound call it keeps formed a reference cycle, which only
        the cyclic garbage collector frees. That cycle is gone; this makes sure of the memory whatever else might
        hold a plan. A storage freed here goes back as a dropped tensor's does: stream-ordered after the kernels
        already launched on it."""
        kept = {t.untyped_storage().data_ptr() for t in keep if t is not None}
        derived = [v for v in self.memo.values() if isinstance(v, Tensor)]   # a conv's reordered weight, ...
        for t in (self.qweight, self.scale, self.bias, self.smooth, *derived):
            if t is not None and t.untyped_storage().data_ptr() not in kept:
                t.untyped_storage().resize_(0)

    def remember(self, key, make):
        """``make()`` once per operand set: backends keep derived weights here (tensors of their own, never views
        of buffers shared beyond this operand set: ``free_copies`` frees them)."""
        value = self.memo.get(key)
        if value is None:
            with graph_pool.outside(self.qweight.device):   # kept: not in a CUDA-graph warm-up's pool
                value = self.memo[key] = make()
        return value

    def float_weight(self, dtype: torch.dtype) -> Tensor:
        """The dequantized weight in ``dtype`` (SmoothQuant left folded in: callers divide x)."""
        view = self.scale.reshape((-1,) + (1,) * (self.qweight.dim() - 1))
        return (self.qweight.float() * view).to(dtype)
