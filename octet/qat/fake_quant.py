"""Fake quantization: float twins of the INT8 layers that QAT trains, and their way back.

Every QuantLinear / QuantConv2d gets a *fake-quant twin* that computes in float what the INT8
kernels compute: weights rounded to the same per-output-channel grid, activations to the same
per-token (linear) / per-sample (conv) dynamic grid or the same static scale, round half to even
and clamp to [-Q, Q] - but with straight-through gradients. The trainable parameters are the
scales (LSQ: the step size gets the gradient of the rounding it controls) and an optional low-rank
correction ``B @ A`` added to the weight *before* quantization; the weights themselves stay frozen.

``fold`` turns every twin back into a real QuantLayer: LoRA merged into the weight, the weight
re-quantized with the learned scales, the learned static scale written to ``input_scale``.
Inference then runs the real INT8 kernels; no fake quantization remains.

Scales are learned in log space, as a log-ratio to the PTQ scale (TQT learns log2 thresholds the
same way): Adam's step is then a relative change whatever the layer's magnitude, and a scale can
never turn zero or negative.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...kernels.torch_ref import (MIN_SCALE, QMAX, quantize_weight, quantize_with_scale, row_scales, sample_scales,
                                  smoothed)
from ..api import OctetError
from ..modules import QuantConv2d, QuantLayer, QuantLinear
from .config import QATConfig, qmax_for


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """torch.round (half to even, like the kernels) forward, identity backward."""
    return x + (torch.round(x) - x).detach()


def fake_quant(x: torch.Tensor, scale: torch.Tensor, qmax: float = QMAX) -> torch.Tensor:
    """clamp(round(x / scale)) * scale in float, with LSQ/STE gradients to x and scale.

    The division is written exactly as ``torch_ref.quantize_with_scale`` writes it, so the integer
    grid points chosen here are the ones the real kernels choose (tested bit for bit). Clamping
    before rounding gives the same integers (qmax is an integer) and LSQ's gradient mask |x/s| <= Q;
    clamping the straight-through value afterwards would drop gradients at random near the edge,
    where x + (round(x) - x) lands one ulp beyond qmax.
    """
    return round_ste(torch.clamp(x / scale, -qmax, qmax)) * scale


def quantize_weight_bits(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric quantization to ``bits`` (8 or 4), stored as int8 + scale [N, 1]:
    ``torch_ref.quantize_weight`` with that width's grid. 4-bit values live in int8 containers, so the
    INT8 kernels run them unchanged (no memory saving: a quality experiment)."""
    return quantize_weight(weight, qmax_for(bits))


def _quantize_input(x: torch.Tensor, conv: bool, static_scale: Optional[torch.Tensor]) -> torch.Tensor:
    """Fake-quantize an activation with the kernels' granularity: per token / per sample / static."""
    if static_scale is not None:
        return fake_quant(x, static_scale.reshape(()))
    # The dynamic scale is a statistic of the data, not a parameter the kernels could take: no gradient.
    scale = sample_scales(x.detach()).reshape(-1, 1, 1, 1) if conv else row_scales(x.detach())
    return fake_quant(x, scale)


class FakeQuantLayer(nn.Module):
    """Float twin of a QuantLayer with trainable (log-)scales and optional LoRA; see module docstring.

    ``latent_weight`` is the float weight in the kernel's domain (i.e. multiplied by the SmoothQuant
    factor where the layer has one), taken from the float model when available: re-rounding it with
    the initial scales reproduces the PTQ int8 weight exactly, and learned scales may move a weight
    to the other grid point, which a dequantized int8 weight could not tell.
    """

    is_conv = False

    def __init__(self, layer: QuantLayer, float_weight: Optional[torch.Tensor] = None, rank: int = 0,
                 weight_bits: int = 8, learn_weight_scales: bool = True, learn_act_scales: bool = True,
                 generator: Optional[torch.Generator] = None):
        super().__init__()
        if layer.weight_function or layer.bias_function:
            raise OctetError("This quantized layer carries weight patches (a LoRA or similar). Run QAT Fine-tune "
                             "before applying LoRAs to the quantized MODEL.")
        device = layer.weight.device
        smooth = layer.pre_quant_scale
        if float_weight is None:
            latent = layer.dequantized_weight(torch.float32, device)
            latent = layer.layout.fold_smoothing(latent, smooth)  # back to the smoothed domain the int8 weight lives in
        else:
            if tuple(float_weight.shape) != tuple(layer.weight.shape):
                raise OctetError(f"The float weight has shape {tuple(float_weight.shape)} but the quantized layer "
                                 f"{tuple(layer.weight.shape)}: connect the float MODEL this one was quantized from.")
            latent = float_weight.detach().to(device)
            if smooth is not None:  # exactly what from_float did before quantizing
                latent = layer.layout.fold_smoothing(latent.float(), smooth)
        # clone(): inputs may be inference tensors (ComfyUI runs nodes under inference_mode), which
        # autograd refuses to save; a fresh copy made outside inference mode is a normal tensor.
        self.register_buffer("latent_weight", latent.clone())
        self.weight_bits = weight_bits
        self.qmax = qmax_for(weight_bits)
        if weight_bits == 8:
            scale = layer.weight_scale.detach().float().clone()
        else:
            scale = quantize_weight_bits(latent, weight_bits)[1].to(device)
        # scale = initial * exp(log_ratio), log_ratio starting at 0: exp(0) == 1 exactly, so the twin
        # starts on the very grid of the real layer (exp(log(s)) could be one ulp off s).
        self.register_buffer("weight_scale0", scale.reshape(-1, 1))
        self.log_weight_scale = nn.Parameter(torch.zeros_like(self.weight_scale0), requires_grad=learn_weight_scales)
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().float().clone())
        self.register_buffer("pre_quant_scale", None if smooth is None else smooth.detach().float().clone())
        self.act = layer.act
        self.backend = layer.backend
        self.group_selector = layer.group_selector
        self.log_input_scale = None
        self.register_buffer("input_scale0", None)
        if self.act == "static":
            if layer.input_scale is None:
                raise OctetError("A static layer has no input_scale: quantize the MODEL with a CALIBRATION first.")
            self.input_scale0 = layer.input_scale.detach().float().clone()
            self.log_input_scale = nn.Parameter(torch.zeros_like(self.input_scale0), requires_grad=learn_act_scales)
        self.rank = rank
        n, k = latent.shape[0], latent[0].numel()
        if rank > 0:
            # B = 0: the twin starts exactly at the PTQ model; A like nn.Linear's default init.
            # Drawn from ``generator`` (make_twins seeds it from QATConfig.seed): the global RNG would make
            # a run depend on whatever drew before it (a test suite's order changed a QAT result).
            a = torch.empty(rank, k)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
            a = a.to(device)
            self.lora_a = nn.Parameter(a)
            self.lora_b = nn.Parameter(torch.zeros(n, rank, device=device))
        else:
            self.lora_a = self.lora_b = None

    # -- the quantities the kernels will see -----------------------------------------------------
    def weight_scale(self) -> torch.Tensor:
        return self.weight_scale0 * self.log_weight_scale.exp()

    def input_scale(self) -> Optional[torch.Tensor]:
        return None if self.log_input_scale is None else self.input_scale0 * self.log_input_scale.exp()

    def merged_weight(self) -> torch.Tensor:
        w = self.latent_weight.float()
        if self.lora_a is not None:
            w = w + (self.lora_b @ self.lora_a).reshape(w.shape)
        return w

    def fake_weight(self) -> torch.Tensor:
        w = self.merged_weight()
        scale = self.weight_scale().reshape((-1,) + (1,) * (w.dim() - 1))
        return fake_quant(w, scale, self.qmax)

    def _static_scale(self) -> Optional[torch.Tensor]:
        scales = self.input_scale()
        if scales is None:
            return None
        group = 0 if self.group_selector is None or scales.numel() == 1 else self.group_selector.index
        return scales[group]

    def fake_input(self, x: torch.Tensor) -> torch.Tensor:
        xs = smoothed(x, self.pre_quant_scale, channel_dim=1 if self.is_conv else -1)
        if self.act == "none":
            return xs
        return _quantize_input(xs, self.is_conv, self._static_scale())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.fake_weight()
        return self._op(self.fake_input(x), w, self.bias).to(x.dtype)

    def trainable(self) -> dict[str, list[nn.Parameter]]:
        scales = [p for p in (self.log_weight_scale, self.log_input_scale) if p is not None and p.requires_grad]
        lora = [p for p in (self.lora_a, self.lora_b) if p is not None]
        return {"scales": scales, "lora": lora}

    # -- back to a real INT8 layer -----------------------------------------------------------------
    @torch.no_grad()
    def fold(self) -> QuantLayer:
        """A real QuantLayer: LoRA merged, weight re-quantized with the learned scales."""
        w = self.merged_weight()
        scale = self.weight_scale().float().reshape(-1, 1).clamp_min(MIN_SCALE)
        qweight = quantize_with_scale(w, scale.reshape((-1,) + (1,) * (w.dim() - 1)), self.qmax)
        layer = self._quant_layer(qweight, scale.clone())
        if self.pre_quant_scale is not None:
            layer.set_smoothing(self.pre_quant_scale)
        if self.log_input_scale is not None:
            layer.set_static_scales(self.input_scale().clamp_min(MIN_SCALE), self.group_selector)
        return layer


class FakeQuantLinear(FakeQuantLayer):
    def _op(self, x, w, b):
        return F.linear(x, w, b)

    def _quant_layer(self, qweight, scale):
        return QuantLinear(qweight, scale, self.bias, self.act, self.backend)


class FakeQuantConv2d(FakeQuantLayer):
    is_conv = True

    def __init__(self, layer: QuantConv2d, *args, **kwargs):
        super().__init__(layer, *args, **kwargs)
        self.stride, self.padding, self.dilation, self.groups = layer.stride, layer.padding, layer.dilation, layer.groups

    def _op(self, x, w, b):
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def _quant_layer(self, qweight, scale):
        return QuantConv2d(qweight, scale, self.bias, self.act, self.backend, stride=self.stride,
                           padding=self.padding, dilation=self.dilation, groups=self.groups)


def fake_quant_twin(layer: QuantLayer, float_weight: Optional[torch.Tensor] = None, rank: int = 0,
                    weight_bits: int = 8, learn_weight_scales: bool = True,
                    learn_act_scales: bool = True, generator: Optional[torch.Generator] = None) -> FakeQuantLayer:
    cls = {QuantLinear: FakeQuantLinear, QuantConv2d: FakeQuantConv2d}.get(type(layer))
    if cls is None:
        raise OctetError(f"No fake-quant twin for {type(layer).__name__}; QAT handles QuantLinear and QuantConv2d.")
    return cls(layer, float_weight, rank, weight_bits, learn_weight_scales, learn_act_scales, generator)


def make_twins(layers: dict[str, QuantLayer], float_model: Optional[nn.Module], config: QATConfig,
               device: Optional[torch.device] = None) -> dict[str, FakeQuantLayer]:
    """Twins for the given quantized layers; float weights are looked up by name in ``float_model``."""
    float_modules = dict(float_model.named_modules()) if float_model is not None else {}
    twins = {}
    g = torch.Generator().manual_seed(config.seed)   # LoRA init: reproducible whatever ran before
    with torch.inference_mode(False):
        for name, layer in layers.items():
            fm = float_modules.get(name)
            fw = getattr(fm, "weight", None) if fm is not None and not isinstance(fm, QuantLayer) else None
            twin = fake_quant_twin(layer, fw, config.lora_rank, config.weight_bits, config.learn_weight_scales,
                                   config.learn_act_scales, g)
            twins[name] = twin.to(device) if device is not None else twin
    return twins


def fold(twins: dict[str, FakeQuantLayer], device: Optional[torch.device] = None) -> dict[str, QuantLayer]:
    out = {}
    for name, twin in twins.items():
        layer = twin.fold()
        out[name] = layer.to(device) if device is not None else layer
    return out


def requantize(layers: dict[str, QuantLayer], float_model: nn.Module, weight_bits: int) -> dict[str, QuantLayer]:
    """PTQ at another weight width: the same layers (act mode, static scales, smoothing) with
    round-to-nearest ``weight_bits`` weights. The baseline QAT at that width is compared against."""
    cfg = QATConfig(lora_rank=0, weight_bits=weight_bits)
    return fold(make_twins(layers, float_model, cfg))
