"""Quantization-aware fine-tuning: fake quantization, learnable scales, LoRA, data-free distillation.

The recipe is EfficientDM's (He et al., 2024), sized for a node, in three parts:

  * ``fake_quant``: every QuantLinear / QuantConv2d gets a float twin that computes what the INT8
    kernels compute, with straight-through gradients to its (log-)scales and an optional LoRA;
    ``fold`` turns the twins back into real INT8 layers;
  * ``teacher``: the float model's own denoiser calls on its own sampling trajectories
    (``record_teacher``), so no training data is needed;
  * ``distill``: the twins, swapped into the float model, trained one recorded call per step to
    reproduce the teacher's outputs, scored on calls the training never sees.

Nothing here imports ComfyUI; nodes/sampling.py records the teacher with the host's own sampler
and hands the calls to ``distill``.
"""
from .config import WEIGHT_BITS, QATConfig, qmax_for
from .distill import DistillResult, distill
from .fake_quant import (FakeQuantConv2d, FakeQuantLayer, FakeQuantLinear, fake_quant, fake_quant_twin, fold,
                         make_twins, quantize_weight_bits, requantize, round_ste)
from .teacher import Teacher, TeacherCall, record_teacher

__all__ = ["WEIGHT_BITS", "QATConfig", "qmax_for", "DistillResult", "distill", "FakeQuantConv2d", "FakeQuantLayer",
           "FakeQuantLinear", "fake_quant", "fake_quant_twin", "fold", "make_twins", "quantize_weight_bits",
           "requantize", "round_ste", "Teacher", "TeacherCall", "record_teacher"]
