"""Quantize Model: MODEL in, INT8 MODEL out (the source MODEL is left as it was).

The static W8A8 settings (observer, percentile, timestep groups, SmoothQuant) are widgets here, next
to the mode they belong to: a CALIBRATION only holds statistics, and these settings turn them into
scales at quantize time. ``static_inputs`` / ``static_config`` are shared with Static Attribution, so
it measures the static layers Quantize Model builds.
"""
from __future__ import annotations

import comfy.utils
from comfy_api.latest import io

from ..octet import config_for_mode
from ..octet.config import BACKENDS, GOALS, MODES, STATIC_RECIPE, StaticW8A8Config
from . import bridge, graph_step
from .progress import interruptible
from .types import CALIBRATION, POLICY
from .widgets import require_finite

MODE_TIPS = ("weight_only: int8 weights, float activations (W8A16), the safest. "
             "dynamic: int8 weights and activations with per-token scales computed each step (W8A8); with a "
             "CALIBRATION connected and smoothquant on, also SmoothQuant (better on outlier channels). "
             "static: W8A8 with activation scales from a CALIBRATION (fastest; needs Calibrate).")

# Octet's static recipe, which Calibrate's widgets defaulted to before the settings moved here: the same
# numbers for the same workflow. Optional inputs, so API workflows saved before the move (which lack them)
# still run, with these values.
STATIC_DEFAULTS = {"observer": STATIC_RECIPE.observer, "percentile": STATIC_RECIPE.percentile,
                   "use_timestep_groups": STATIC_RECIPE.timestep_groups, "smooth_alpha": STATIC_RECIPE.smooth_alpha,
                   "smoothquant": STATIC_RECIPE.smooth_alpha is not None}


def static_inputs(used_when: str = "Used in mode 'static'.") -> list:
    """The StaticW8A8Config widgets: how a CALIBRATION's statistics become static scales."""
    d = STATIC_DEFAULTS
    return [
        io.Combo.Input("observer", options=list(StaticW8A8Config.OBSERVERS), default=d["observer"], optional=True,
                       tooltip=f"{used_when} How a static activation range is chosen from the CALIBRATION: minmax "
                               "(largest value seen; outliers cost resolution), percentile (clip the rarest values), "
                               "mse (the clip with the least expected INT8 error, from the histogram)."),
        io.Float.Input("percentile", default=d["percentile"], min=50.01, max=100.0, step=0.001, optional=True,
                       tooltip=f"{used_when} For observer 'percentile': the share of values kept unclipped."),
        io.Boolean.Input("use_timestep_groups", default=d["use_timestep_groups"], optional=True,
                         tooltip=f"{used_when} One activation scale per timestep group of the CALIBRATION (follows "
                                 "sigma while sampling) instead of one for the whole trajectory."),
        io.Float.Input("smooth_alpha", default=d["smooth_alpha"], min=0.0, max=1.0, step=0.05, optional=True,
                       tooltip=f"{used_when} SmoothQuant migration strength alpha (when smoothquant is on; mode "
                               "'dynamic' uses it too when a CALIBRATION is connected)."),
        io.Boolean.Input("smoothquant", default=d["smoothquant"], optional=True,
                         tooltip=f"{used_when} Divide outlier input channels by s = max|X|^a / max|W|^(1-a) and "
                                 "fold s into the weights (exact in float; less INT8 error on outlier channels). Mode "
                                 "'dynamic' uses it too when a CALIBRATION is connected."),
    ]


def _with_defaults(**widgets) -> dict:
    """Widget values as given, None -> the STATIC_DEFAULTS value (inputs an older workflow lacks)."""
    return {k: STATIC_DEFAULTS[k] if x is None else x for k, x in widgets.items()}


def static_config(node: str, observer=None, percentile=None, use_timestep_groups=None, smooth_alpha=None,
                  smoothquant=None, **base) -> StaticW8A8Config:
    """The widgets of ``static_inputs`` (None: the default) as a StaticW8A8Config, which validates them.
    ``base``: the fields every mode shares (kinds, backend, goal)."""
    v = _with_defaults(observer=observer, percentile=percentile, use_timestep_groups=use_timestep_groups,
                       smooth_alpha=smooth_alpha, smoothquant=smoothquant)
    require_finite(node, percentile=v["percentile"], smooth_alpha=v["smooth_alpha"])
    return StaticW8A8Config(observer=v["observer"], percentile=float(v["percentile"]),
                            timestep_groups=bool(v["use_timestep_groups"]),
                            smooth_alpha=float(v["smooth_alpha"]) if v["smoothquant"] else None, **base)


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
                *static_inputs(),
                io.Combo.Input("cuda_graph", options=list(graph_step.CHOICES), default="auto", optional=True,
                               tooltip=graph_step.CHOICE_TIP),
            ],
            outputs=[io.Model.Output(display_name="MODEL"),
                     io.String.Output(display_name="report", tooltip="Per-layer decisions and sizes.")],
        )

    @classmethod
    def execute(cls, model, mode, quantize_linear, quantize_conv, backend, policy=None, calibration=None,
                goal="speed", observer=None, percentile=None, use_timestep_groups=None, smooth_alpha=None,
                smoothquant=None, cuda_graph=None):
        kinds = tuple(k for k, on in (("linear", quantize_linear), ("conv", quantize_conv)) if on)
        base = {"kinds": kinds, "backend": backend, "goal": goal or "speed"}
        sq = _with_defaults(smooth_alpha=smooth_alpha, smoothquant=smoothquant)
        if mode == "static":
            config = static_config("Quantize Model", observer, percentile, use_timestep_groups, smooth_alpha,
                                   smoothquant, **base)
        elif mode == "dynamic" and calibration is not None and sq["smoothquant"]:
            # SmoothQuant helps per-token scales too (one loud channel still sets each row's scale); its factors
            # come from the CALIBRATION, so it applies only when one is connected (docs/QUALITY.md: +1.8 to +2.2 dB
            # over plain dynamic on the reference DiT/MMDiT, +15 to +21 dB on their outlier twins).
            require_finite("Quantize Model", smooth_alpha=sq["smooth_alpha"])
            config = config_for_mode(mode, smooth_alpha=float(sq["smooth_alpha"]), **base)
        else:  # the static widgets do not apply
            config = config_for_mode(mode, **base)
        bar = comfy.utils.ProgressBar(1)
        quantized, result = bridge.quantize_model(model, config, policy=policy, calibration=calibration,
                                                  progress=interruptible(bar))
        graphs = graph_step.install_default(quantized, cuda_graph or "auto", base["goal"])
        return io.NodeOutput(quantized, f"{result.to_text()}\n{graphs}")
