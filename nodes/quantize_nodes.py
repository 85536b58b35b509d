"""Quantize Model: MODEL in, INT8 MODEL out (the source MODEL is left as it was)."""
from __future__ import annotations

import comfy.utils
from comfy_api.latest import io

from ..octet import config_for_mode
from ..octet.config import BACKENDS, GOALS, MODES
from . import bridge
from .progress import interruptible
from .types import CALIBRATION, POLICY

MODE_TIPS = ("weight_only: int8 weights, float activations (W8A16), the safest. "
             "dynamic: int8 weights and activations with per-token scales computed each step (W8A8). "
             "static: W8A8 with activation scales from a CALIBRATION (fastest; needs Calibrate).")


class QuantizeModel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="OctetQuantizeModel",
            display_name="Quantize Model (INT8)",
            category="octet",
            description="Swap the model's Linear/Conv2d layers for INT8 layers. The input MODEL is not changed.",
            inputs=[
                io.Model.Input("model", tooltip="The float diffusion model (UNet or DiT) to quantize."),
                io.Combo.Input("mode", options=list(MODES), default="dynamic", tooltip=MODE_TIPS),
                io.Boolean.Input("quantize_linear", default=True, tooltip="Quantize Linear layers (attention, MLP)."),
                io.Boolean.Input("quantize_conv", default=True, tooltip="Quantize Conv2d layers (UNet ResBlocks)."),
                io.Combo.Input("backend", options=list(BACKENDS), default="auto",
                               tooltip="INT8 kernels: auto picks the fastest available per layer and logs fallbacks."),
                io.Combo.Input("goal", options=list(GOALS), default="speed", optional=True,
                               tooltip="Where INT8 is slower than bf16 at a layer's shapes (small GPU layers): 'speed' "
                                       "keeps a bf16 copy of that layer's weight (costs VRAM, logged), 'memory' keeps "
                                       "only int8 and reads it directly (or dequantizes per call)."),
                POLICY.Input("policy", optional=True,
                             tooltip="Mixed-precision policy: which layers stay in float and which mode each gets."),
                CALIBRATION.Input("calibration", optional=True,
                                  tooltip="Activation statistics from Calibrate; required for mode 'static'."),
            ],
            outputs=[io.Model.Output(display_name="MODEL"),
                     io.String.Output(display_name="report", tooltip="Per-layer decisions and sizes.")],
        )

    @classmethod
    def execute(cls, model, mode, quantize_linear, quantize_conv, backend, policy=None, calibration=None,
                goal="speed"):
        kinds = tuple(k for k, on in (("linear", quantize_linear), ("conv", quantize_conv)) if on)
        # Static settings (observer, groups, SmoothQuant alpha) are chosen on Calibrate / Load Calibration.
        static = calibration.static_settings() if mode == "static" and calibration is not None else {}
        config = config_for_mode(mode, kinds=kinds, backend=backend, goal=goal or "speed", **static)
        bar = comfy.utils.ProgressBar(1)
        quantized, result = bridge.quantize_model(model, config, policy=policy, calibration=calibration,
                                                  progress=interruptible(bar))
        return io.NodeOutput(quantized, result.to_text())
