"""QuantLinear and QuantConv2d: INT8 weights with per-output-channel scales.

The tensors are named as ComfyUI's quantized checkpoints name them (``weight`` int8,
``weight_scale`` fp32 [N, 1], ``input_scale``, ``pre_quant_scale``), so a state dict of these
modules *is* the checkpoint format.

They also carry the attributes ComfyUI's ModelPatcher looks for on its own ops
(``comfy_cast_weights``, ``weight_function``, ``bias_function``): the patcher can then leave a
layer's weights in CPU RAM under lowvram (we move them per call, as comfy.ops does) or attach
weight functions such as on-the-fly LoRA (we apply them to the dequantized weight). Nothing here
imports ComfyUI.
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import kernels
from .timestep import GroupSelector


# -- host hook (set by nodes/host_compat.py; the core never imports ComfyUI) ----------------------
# What the host's ``weight_function`` patches (LoRA under lowvram) take: ComfyUI 0.3.75's
# LowVramPatch takes the stored form and converts it itself (through our convert_weight/set_weight);
# 0.29's takes the float weight (its ops dequantize before applying them) and ignores those hooks.
WEIGHT_FUNCTIONS_TAKE_FLOAT = False


def _on(t: Optional[torch.Tensor], device: torch.device) -> Optional[torch.Tensor]:
    if t is None or t.device == device:
        return t
    return t.to(device, non_blocking=True)


class QuantLayer(nn.Module):
    """Shared state and forward logic; subclasses supply the op."""

    comfy_cast_weights = False  # read by ModelPatcher; True means "weights may live off-device"

    def __init__(self, qweight: torch.Tensor, weight_scale: torch.Tensor, bias: Optional[torch.Tensor],
                 act: str, backend: str = "auto"):
        super().__init__()
        if act not in kernels.registry.ACT_MODES:
            raise ValueError(f"act={act!r}; expected one of {kernels.registry.ACT_MODES}")
        if qweight.dtype != torch.int8:
            raise TypeError(f"qweight must be int8, got {qweight.dtype}")
        if weight_scale.numel() != qweight.shape[0]:
            raise ValueError(f"weight_scale has {weight_scale.numel()} values for {qweight.shape[0]} output channels")
        self.weight = nn.Parameter(qweight, requires_grad=False)
        self.register_buffer("weight_scale", weight_scale.float().reshape(-1, 1).contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.register_buffer("input_scale", None)       # static W8A8: [groups] fp32
        self.register_buffer("pre_quant_scale", None)   # SmoothQuant divisor: [in_channels] fp32
        self.act = act
        self.backend = backend
        self.group_selector: Optional[GroupSelector] = None
        self.weight_function = []
        self.bias_function = []
        self._patched_scale = None  # (weakref to weight, its _version, scale) after a merged LoRA

    def set_smoothing(self, smooth: torch.Tensor) -> None:
        if self.act == "none":
            raise ValueError("SmoothQuant needs INT8 activations; it has no meaning for weight-only layers.")
        self.pre_quant_scale = smooth.detach().float().reshape(-1).clone()

    # -- static activation scales (timestep groups) -------------------------------------------
    def set_static_scales(self, input_scale: torch.Tensor, selector: Optional[GroupSelector] = None) -> None:
        scales = input_scale.detach().float().reshape(-1).clone()
        if not torch.isfinite(scales).all() or (scales <= 0).any():
            raise ValueError("static input scales must be finite and positive")
        self.input_scale = scales
        self.group_selector = selector

    def _static_scale(self, device: torch.device) -> Optional[torch.Tensor]:
        if self.act != "static":
            return None
        if self.input_scale is None:
            raise RuntimeError("This layer is static W8A8 but has no input_scale: quantize it with a CALIBRATION.")
        group = 0 if self.group_selector is None or self.input_scale.numel() == 1 else self.group_selector.index
        return _on(self.input_scale[group:group + 1], device)

    # -- weights ---------------------------------------------------------------------------------
    # ComfyUI patches weights (LoRA) through three hooks it looks up by name on the op:
    #   convert_weight(raw)  -> the float weight the patch math works on;
    #   set_weight(float)    -> store the patched weight (merged: re-quantized to int8), or with
    #                           return_weight=True hand back the raw form for a per-call patch;
    #   weight_function[...] -> per-call patches (lowvram), applied to the raw form.
    # "Raw" is the int8 code as a float tensor: raw * scale / smooth is the float weight.
    def _weight_view(self, t: torch.Tensor, device, dtype) -> torch.Tensor:
        return _on(t, device).to(dtype).reshape([-1, 1] + [1] * (self.weight.dim() - 2))

    def _smooth_view(self, device, dtype) -> torch.Tensor:
        return _on(self.pre_quant_scale, device).to(dtype).reshape([1, -1] + [1] * (self.weight.dim() - 2))

    def current_weight_scale(self) -> torch.Tensor:
        """The scale of the int8 codes now in ``weight``: a merged LoRA re-quantizes with new scales,
        which hold only while that exact tensor is in place (the host restores the original
        weight by replacing or overwriting it, which retires them)."""
        patched = self._patched_scale
        if patched is None:  # the common case, and the only one torch.compile needs to trace
            return self.weight_scale
        ref, version, scale = patched
        if ref() is self.weight and self.weight._version == version:
            return scale
        self._patched_scale = None
        return self.weight_scale

    def convert_weight(self, weight: torch.Tensor, inplace: bool = False, **kwargs) -> torch.Tensor:
        w = weight * self._weight_view(self.current_weight_scale(), weight.device, weight.dtype)
        if self.pre_quant_scale is not None:
            w = w / self._smooth_view(weight.device, weight.dtype)
        return w

    def set_weight(self, weight: torch.Tensor, inplace_update: bool = False, seed=None, return_weight: bool = False,
                   **kwargs):
        w = weight.float()
        if self.pre_quant_scale is not None:
            w = w * self._smooth_view(w.device, w.dtype)
        if return_weight:
            return w / self._weight_view(self.current_weight_scale(), w.device, w.dtype)
        q, scale = kernels.quantize_weight(w)
        q = q.to(self.weight.device)
        if inplace_update:
            self.weight.data.copy_(q)
        else:
            self.weight = nn.Parameter(q, requires_grad=False)
        self._patched_scale = (weakref.ref(self.weight), self.weight._version, scale.to(self.weight_scale.device))

    def dequantized_weight(self, dtype=torch.float32, device=None) -> torch.Tensor:
        device = device or self.weight.device
        return self.convert_weight(_on(self.weight, device).to(dtype))

    def _float_operands(self, x: torch.Tensor):
        """Float weight and bias with ComfyUI's weight/bias functions applied (LoRA under lowvram etc.)."""
        w = _on(self.weight, x.device).to(x.dtype)
        if WEIGHT_FUNCTIONS_TAKE_FLOAT:
            w = self.convert_weight(w)
        for f in self.weight_function:
            w = f(w)
        if not WEIGHT_FUNCTIONS_TAKE_FLOAT:
            w = self.convert_weight(w)
        b = _on(self.bias, x.device)
        if b is not None:
            b = b.to(x.dtype)
            for f in self.bias_function:
                b = f(b)
        return w, b

    def _int8_operands(self, x: torch.Tensor):
        return (_on(self.weight, x.device), _on(self.current_weight_scale(), x.device), _on(self.bias, x.device),
                _on(self.pre_quant_scale, x.device), self._static_scale(x.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_function or self.bias_function:
            # A patch (e.g. LoRA under lowvram) changes the float weight: compute in float.
            return self._float_forward(x, *self._float_operands(x))
        return self._int8_forward(x, *self._int8_operands(x))

    def extra_repr(self) -> str:
        groups = 0 if self.input_scale is None else self.input_scale.numel()
        return (f"act={self.act}, backend={self.backend}, static_groups={groups}, "
                f"smooth={self.pre_quant_scale is not None}")


class QuantLinear(QuantLayer):
    def __init__(self, qweight, weight_scale, bias, act, backend="auto"):
        super().__init__(qweight, weight_scale, bias, act, backend)
        self.out_features, self.in_features = qweight.shape

    @classmethod
    def from_float(cls, linear: nn.Linear, act: str, backend: str = "auto",
                   smooth: Optional[torch.Tensor] = None, weight: Optional[torch.Tensor] = None) -> "QuantLinear":
        w = (linear.weight if weight is None else weight).detach().float()
        if smooth is not None:
            w = w * smooth.float().reshape(1, -1)
        qweight, scale = kernels.quantize_weight(w)
        layer = cls(qweight, scale, linear.bias, act, backend)
        if smooth is not None:
            layer.set_smoothing(smooth)
        return layer

    def _float_forward(self, x, w, b):
        return F.linear(x, w, b)

    def _int8_forward(self, x, qweight, w_scale, bias, smooth, static_scale):
        return kernels.linear(x, qweight, w_scale, bias, act=self.act, smooth=smooth,
                              static_scale=static_scale, backend=self.backend)


class QuantConv2d(QuantLayer):
    def __init__(self, qweight, weight_scale, bias, act, backend="auto", *, stride=1, padding=0, dilation=1,
                 groups=1):
        super().__init__(qweight, weight_scale, bias, act, backend)
        self.out_channels = qweight.shape[0]
        self.in_channels = qweight.shape[1] * groups
        self.kernel_size = tuple(qweight.shape[2:])
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups

    @classmethod
    def from_float(cls, conv: nn.Conv2d, act: str, backend: str = "auto",
                   smooth: Optional[torch.Tensor] = None, weight: Optional[torch.Tensor] = None) -> "QuantConv2d":
        w = (conv.weight if weight is None else weight).detach().float()
        if smooth is not None:
            if conv.groups != 1:
                raise ValueError("SmoothQuant is only defined here for convolutions with groups=1")
            w = w * smooth.float().reshape(1, -1, 1, 1)
        qweight, scale = kernels.quantize_weight(w)
        layer = cls(qweight, scale, conv.bias, act, backend, stride=conv.stride, padding=conv.padding,
                    dilation=conv.dilation, groups=conv.groups)
        if smooth is not None:
            layer.set_smoothing(smooth)
        return layer

    def _conv_args(self):
        return self.stride, self.padding, self.dilation, self.groups

    def _float_forward(self, x, w, b):
        return F.conv2d(x, w, b, *self._conv_args())

    def _int8_forward(self, x, qweight, w_scale, bias, smooth, static_scale):
        return kernels.conv2d(x, qweight, w_scale, bias, *self._conv_args(), act=self.act, smooth=smooth,
                              static_scale=static_scale, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, " + super().extra_repr())


QUANT_TYPES = (QuantLinear, QuantConv2d)
