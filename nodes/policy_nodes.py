"""Mixed-Precision Policy / Sensitivity Policy: which layers Quantize Model leaves in float.

Thin adapters: the policy logic lives in octet/policy.py, octet/presets.py and octet/sensitivity.py.
What only the host knows lives here: the model's config class (for the preset); running its
denoiser on fixed inputs (for sensitivity) is nodes/sampling.py's, inside the host's own sampler so
every model family's conditioning (pooled text, guidance, masks) is prepared by ComfyUI itself.
"""
from __future__ import annotations

import logging

from comfy_api.latest import io

from ..octet import config_for_mode
from ..octet.api import OctetError, quantizable_layers
from ..octet.config import MODES
from ..octet.policy import ACTIONS, DEFAULT
from ..octet.presets import PRESET_NAMES, build_policy, family_for, preset
from ..octet.sensitivity import BUDGETS, sensitivity_policy, summary_text
from . import bridge, sampling
from .progress import interruptible
from . import sampling_defaults as sd
from .types import CALIBRATION, POLICY
from .widgets import require_finite

log = logging.getLogger("octet")
PRESET_CHOICES = ["auto", "none", *PRESET_NAMES]
PRESET_TIP = ("Layers to keep in float, per architecture (timestep/text embeddings, modulation, first and last "
              "layers). auto: detect from the MODEL's ComfyUI model class; none: rules only.")
CONSERVATIVE_TIP = ("Also keep outlier-prone layers in float: cross-attention k/v and FFN down-projections. "
                    "Better quality, less memory saved.")


def detect_preset(model) -> str:
    """Preset name for a MODEL, from its ComfyUI model-config class (MRO, so subclasses map too)."""
    mc = getattr(getattr(model, "model", None), "model_config", None)
    if mc is None:
        raise OctetError("Cannot detect the architecture: connect a diffusion MODEL, or pick a preset by name.")
    return family_for(c.__name__ for c in type(mc).__mro__)


def resolve_preset(choice: str, model) -> str | None:
    if choice == "none":
        return None
    if choice == "auto":
        if model is None:
            raise OctetError("preset 'auto' needs the MODEL input to detect the architecture. Connect the MODEL, "
                             f"or pick one of {list(PRESET_NAMES)}.")
        return detect_preset(model)
    return choice


def _layers(model) -> list[tuple[str, str, int]]:
    return [(n, k, m.weight.numel() + (m.bias.numel() if m.bias is not None else 0))
            for n, m, k in quantizable_layers(bridge.diffusion_model(model))]


class MixedPrecisionPolicy(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="OctetMixedPrecisionPolicy",
            display_name="Mixed-Precision Policy",
            category="octet",
            description="Choose which layers stay in float and which INT8 mode the others get. Precedence: "
                        "overrides, then your rules (first match wins), then the preset, then the default.",
            inputs=[
                io.Combo.Input("preset", options=PRESET_CHOICES, default="auto", tooltip=PRESET_TIP),
                io.Boolean.Input("conservative", default=False, tooltip=CONSERVATIVE_TIP),
                io.Combo.Input("default_action", options=[DEFAULT, *MODES, "keep"], default=DEFAULT,
                               tooltip="For layers no rule matches: 'default' uses Quantize Model's mode; a mode "
                                       "forces it; 'keep' leaves them in float (then rules pick what to quantize)."),
                io.String.Input("rules", multiline=True, default="",
                                tooltip="One rule per line, 'pattern: action'. Glob on layer names (* crosses dots; "
                                        "a module name covers its layers), or 're:' + regex. Actions: "
                                        f"{', '.join(ACTIONS)} (float/bf16/fp16 = keep). "
                                        "Example: '*.attn2.to_k: keep'."),
                io.String.Input("overrides", multiline=True, default="",
                                tooltip="One per line, 'exact.layer.name: action'. Beats every rule. "
                                        "Connect the MODEL to see the layer names."),
                io.Model.Input("model", optional=True,
                               tooltip="Optional: detects the preset (preset=auto) and previews the decision "
                                       "for every layer in the text output."),
            ],
            outputs=[POLICY.Output(display_name="POLICY"),
                     io.String.Output(display_name="summary", tooltip="The rules, and per-layer decisions "
                                                                      "when a MODEL is connected.")],
        )

    @classmethod
    def execute(cls, preset, conservative, default_action, rules, overrides, model=None):
        policy = build_policy(resolve_preset(preset, model), conservative=conservative, rules=rules,
                              overrides=overrides, default_action=default_action)
        text = policy.describe()
        if model is not None:
            layers = _layers(model)
            bad_rules, bad_overrides = policy.unmatched(n for n, _, _ in layers)
            if bad_overrides:
                raise OctetError(f"Overrides name layers this model does not have: {bad_overrides}. Layer names "
                                 f"look like {[n for n, _, _ in layers[:3]]}; see the summary of a run without them.")
            if bad_rules:
                warn = "rules matching no layer (typo?): " + ", ".join(r.pattern for r in bad_rules)
                log.warning("Octet policy: %s", warn)
                text += "\nWARNING " + warn
            text += "\n\n" + policy.preview(layers)
        return io.NodeOutput(policy, text)


class SensitivityPolicy(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        import comfy.samplers
        return io.Schema(
            node_id="OctetSensitivityPolicy",
            display_name="Sensitivity Policy",
            category="octet",
            description="Measure how much each layer's INT8 version changes the model output (one layer at a "
                        "time, over several sampling steps) and keep the most sensitive in float until a budget "
                        "is met. Costs one denoiser pass per layer and step: use few steps on large models.",
            inputs=[
                io.Model.Input("model", tooltip="The float diffusion model to analyse (not already quantized)."),
                io.Conditioning.Input("positive", tooltip="Conditioning representative of your prompts."),
                io.Latent.Input("latent", tooltip="Latent for the measurement (an Empty Latent at a small size is "
                                                  "enough; its batch is the number of samples)."),
                io.Combo.Input("mode", options=list(MODES), default="dynamic",
                               tooltip="INT8 mode to measure with; use the one you give Quantize Model."),
                io.Combo.Input("budget", options=list(BUDGETS), default="max_float_share",
                               tooltip="max_float_share: keep at most this share of parameters in float "
                                       "(value 0..1, e.g. 0.05). min_psnr: keep layers until the output PSNR vs "
                                       "float reaches this many dB (value e.g. 35), checked by a real run."),
                io.Float.Input("value", default=0.05, min=0.0, max=200.0, step=0.01,
                               tooltip="The budget: a share in [0, 1] for max_float_share, dB for min_psnr."),
                io.Combo.Input("base_preset", options=PRESET_CHOICES, default="auto",
                               tooltip="Layers this preset keeps stay in float and are not measured. " + PRESET_TIP),
                io.Int.Input("seed", default=0, min=0, max=2**63 - 1,
                             tooltip="Noise seed of the measurement; the same seed gives the same ranking."),
                io.Int.Input("steps", default=4, min=1, max=50,
                             tooltip="Sampling steps; the denoiser is measured at each step's noise level. Fewer "
                                     "than you sample with (every layer is measured at every step), over the same "
                                     "schedule."),
                io.Float.Input("cfg", default=sd.CFG, min=0.0, max=30.0, step=0.1,
                               tooltip="CFG of the measurement (1.0 runs only the positive branch: half the cost, "
                                       "but other activations than you sample with)." + sd.MATCH_TIP),
                io.Combo.Input("scheduler", options=list(comfy.samplers.SCHEDULER_NAMES), default=sd.SCHEDULER,
                               tooltip="Which noise levels the steps visit." + sd.MATCH_TIP),
                io.Int.Input("block_depth", default=0, min=0, max=8,
                             tooltip="0: measure each layer. N>0: measure blocks (names cut to N parts, e.g. 2 "
                                     "gives 'double_blocks.3'); much faster on large models, coarser decisions."),
                io.Conditioning.Input("negative", optional=True, tooltip="Negative conditioning, used when cfg > 1."),
                CALIBRATION.Input("calibration", optional=True, tooltip="Needed for mode 'static'."),
            ],
            outputs=[POLICY.Output(display_name="POLICY"),
                     io.String.Output(display_name="report", tooltip="Layers ranked by sensitivity, with decisions.")],
        )

    @classmethod
    def execute(cls, model, positive, latent, mode, budget, value, base_preset, seed, steps, cfg, scheduler,
                block_depth, negative=None, calibration=None):
        require_finite("Sensitivity Policy", value=value, cfg=cfg)
        if bridge.quantized_layers(model):
            raise OctetError("This MODEL is already quantized; connect the float MODEL to Sensitivity Policy.")
        import comfy.utils
        family = resolve_preset(base_preset, model)
        base = preset(family) if family else None
        config = config_for_mode(mode)
        dm = bridge.diffusion_model(model)
        bar = comfy.utils.ProgressBar(1)

        def body(run):
            return sensitivity_policy(dm, run, config, budget, value, base=base, calibration=calibration,
                                      block_depth=block_depth or None,
                                      progress=interruptible(bar))

        policy, result, summary = sampling.with_fixed_run(model, positive, negative, latent, seed, steps, cfg, scheduler,
                                                  body)
        keep = [u.name for u in result.units if all(policy.overrides.get(l) == "keep" for l in u.layers)]
        text = summary_text(result, summary) + "\n\n" + result.to_text(keep)
        if result.skipped:
            text += f"\n\nkept by preset {family} (not measured): " + ", ".join(result.skipped)
        return io.NodeOutput(policy, text)

