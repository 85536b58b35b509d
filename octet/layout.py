"""Quantized-weight formats: one layout object per format.

A layout owns everything that is a property of the *format*, so that a reader following one INT8
layer finds each concept once:
  * the math: ``quantize`` (SmoothQuant fold + per-output-channel rounding) and ``dequantize``
    (scale, un-smooth), and ``fold_smoothing`` / ``unfold_smoothing`` used by LoRA merging and QAT;
  * its checkpoint keys (``TENSORS``) and the ``comfy_quant`` record a file carries per layer
    (``spec`` / ``from_spec``); octet/checkpoint.py only reads and writes files;
  * the kernel request key (``kernel_op`` + activation mode + goal), from which a layer plans its
    kernels once per input signature (octet/modules.py).

INT8 is the one format today. A new format (e.g. FP8 weight-only) is a new layout class registered
in ``LAYOUTS`` with its own kernels behind ``kernels.registry``; nothing else branches on formats.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch

from .. import kernels
from . import fileformat
from .config import ACT_OF_MODE, LAYER_KINDS as KINDS

MODE_OF_ACT = {v: k for k, v in ACT_OF_MODE.items()}


def _channel_view(t: torch.Tensor, ndim: int, dim: int) -> torch.Tensor:
    shape = [1] * ndim
    shape[dim] = -1
    return t.reshape(shape)


@dataclass(frozen=True)
class Int8Layout:
    """Symmetric INT8 weight with one fp32 scale per output channel, optional SmoothQuant divisor
    per input channel, and INT8 (dynamic per token / static per timestep group) or float activations."""
    kind: str                 # "linear" | "conv"
    act: str                  # "none" (weight-only) | "dynamic" | "static"
    goal: str = "speed"       # where INT8 loses at a shape: keep a float weight (speed) or not (memory)

    name: ClassVar[str] = "int8"
    HOST_FORMAT: ClassVar[str] = fileformat.HOST_FORMAT    # the host's own format: comfy-kitchen runs these
    OCTET_FORMAT: ClassVar[str] = fileformat.OCTET_FORMAT  # everything else Octet writes
    FORMATS: ClassVar[tuple[str, ...]] = (HOST_FORMAT, OCTET_FORMAT)
    # Tensors a layer of this format owns, by checkpoint key suffix (bias is the layer's own).
    TENSORS: ClassVar[tuple[str, ...]] = ("weight", "weight_scale", "input_scale", "pre_quant_scale")

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind={self.kind!r}; expected one of {KINDS}")
        if self.act not in kernels.registry.ACT_MODES:
            raise ValueError(f"act={self.act!r}; expected one of {kernels.registry.ACT_MODES}")
        if self.goal not in kernels.registry.GOALS:
            raise ValueError(f"goal={self.goal!r}; expected one of {kernels.registry.GOALS}")

    @property
    def mode(self) -> str:
        return MODE_OF_ACT[self.act]

    @property
    def kernel_op(self) -> str:
        return "linear" if self.kind == "linear" else "conv2d"

    # ---- math ----------------------------------------------------------------------------------
    @staticmethod
    def fold_smoothing(weight: torch.Tensor, smooth: Optional[torch.Tensor]) -> torch.Tensor:
        """W * s per input channel: SmoothQuant moves activation outliers into the weight."""
        if smooth is None:
            return weight
        return weight * _channel_view(smooth.to(weight.device, weight.dtype), weight.dim(), 1)

    @staticmethod
    def unfold_smoothing(weight: torch.Tensor, smooth: Optional[torch.Tensor]) -> torch.Tensor:
        if smooth is None:
            return weight
        return weight / _channel_view(smooth.to(weight.device, weight.dtype), weight.dim(), 1)

    @classmethod
    def quantize(cls, weight: torch.Tensor, smooth: Optional[torch.Tensor] = None):
        """(int8 codes, fp32 scale [N, 1]) of ``weight`` with ``smooth`` folded in first."""
        return kernels.torch_ref.quantize_weight(cls.fold_smoothing(weight.detach().float(), smooth))

    @staticmethod
    def scale_raw(raw: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Codes (as floats) times their per-output-channel scale."""
        return raw * _channel_view(scale.to(raw.device, raw.dtype), raw.dim(), 0)

    @classmethod
    def dequantize(cls, qweight: torch.Tensor, scale: torch.Tensor, smooth: Optional[torch.Tensor] = None,
                   dtype=torch.float32) -> torch.Tensor:
        """The float weight the codes stand for (SmoothQuant undone)."""
        return cls.unfold_smoothing(cls.scale_raw(qweight.to(dtype), scale), smooth)

    # ---- checkpoint record ------------------------------------------------------------------------
    def spec(self, layer) -> dict:
        """The layer's ``comfy_quant`` record: the host's format where the host can run the layer
        (a Linear without smoothing: comfy-kitchen's int8_tensorwise computes with the per-row weight,
        whatever Octet's activation mode, which rides in "octet"), Octet's otherwise."""
        host = self.kind == "linear" and layer.pre_quant_scale is None
        spec = {"format": self.HOST_FORMAT if host else self.OCTET_FORMAT,
                "octet": {"kind": self.kind, "act": self.act}}
        if self.kind == "conv":
            g = layer.geometry
            spec["octet"].update(stride=list(g.stride),
                                 padding=g.padding if isinstance(g.padding, str) else list(g.padding),
                                 dilation=list(g.dilation), groups=g.groups)
        if layer.input_scale is not None:
            spec["octet"]["timestep_groups"] = layer.group_selector is not None
        if layer.pre_quant_scale is not None:  # lets the loader refuse a file whose smoothing divisor went missing
            spec["octet"]["smoothed"] = True
        return spec

    @classmethod
    def from_spec(cls, spec: dict, weight: torch.Tensor, goal: str = "speed") -> "Int8Layout":
        extra = spec.get("octet", {})
        kind = extra.get("kind", "conv" if weight.dim() == 4 else "linear")
        return cls(kind, extra.get("act", "dynamic"), goal)


LAYOUTS: dict[str, type] = {Int8Layout.name: Int8Layout}
# comfy_quant "format" names -> the layout that reads them.
FILE_FORMATS: dict[str, type] = {f: Int8Layout for f in Int8Layout.FORMATS}
