"""Static Attribution: which layers lose when made static, and a per-layer static/dynamic POLICY (issue 15).

The work is ``octet.attribution``; this file only builds the fixed denoiser states from the host sampler.
"""
from __future__ import annotations

from comfy_api.latest import io

from ..octet.api import OctetError
from ..octet.attribution import attribute, auto_policy
from ..octet.presets import preset
from . import bridge, sampling
from . import sampling_defaults as sd
from .policy_nodes import PRESET_TIP, resolve_preset
from .quantize_nodes import static_config, static_inputs
from .types import CALIBRATION, POLICY


class StaticAttribution(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        import comfy.samplers
        return io.Schema(
            node_id="OctetStaticAttribution",
            display_name="Static Attribution (auto policy)",
            category="octet",
            description="Measure each layer alone as static (with the CALIBRATION) and as dynamic per-token, per "
                        "timestep group, with the activation statistics that explain the difference; output a "
                        "POLICY that keeps static where it is within margin_db of dynamic and makes the rest "
                        "dynamic (one-row-per-sample inputs such as adaLN are always dynamic: their range moves "
                        "with timestep and prompt). Connect it with the CALIBRATION to Quantize Model (static).",
            inputs=[
                io.Model.Input("model", tooltip="The float diffusion model (not already quantized)."),
                io.Conditioning.Input("positive", tooltip="Prompts like yours; other prompts than the calibration's "
                                                          "show how static generalises."),
                io.Conditioning.Input("negative", tooltip="Negative conditioning, as you sample."),
                io.Latent.Input("latent", tooltip="Latent for the measurement (small is fine; batch = samples)."),
                CALIBRATION.Input("calibration", tooltip="From Calibrate / Load Calibration."),
                io.Float.Input("margin_db", default=1.0, min=0.0, max=30.0, step=0.1,
                               tooltip="Static is kept where its output error (layer alone) is at most this many dB "
                                       "above dynamic's."),
                io.Combo.Input("base_preset", options=["none", "auto"], default="auto",
                               tooltip="Layers this preset keeps in float stay float. " + PRESET_TIP),
                io.Int.Input("seed", default=0, min=0, max=2**63 - 1, tooltip="Noise seed of the measured trajectory."),
                io.Int.Input("steps", default=8, min=1, max=50,
                             tooltip="Steps of the measured trajectory (every layer is measured twice per step)."),
                io.Float.Input("cfg", default=sd.CFG, min=0.0, max=30.0, step=0.1, tooltip="CFG." + sd.MATCH_TIP),
                io.Combo.Input("scheduler", options=list(comfy.samplers.SCHEDULER_NAMES), default=sd.SCHEDULER,
                               tooltip="Scheduler." + sd.MATCH_TIP),
                io.Int.Input("top", default=15, min=1, max=1000, tooltip="Layers shown in the report."),
                *static_inputs("The static recipe to measure: set it as on Quantize Model."),
            ],
            outputs=[POLICY.Output(display_name="POLICY"),
                     io.String.Output(display_name="report",
                                      tooltip="Worst layers when static: per-group output PSNR (a model-output proxy, "
                                              "not image PSNR), range, channel spread, clipped share, choice.")],
        )

    @classmethod
    def execute(cls, model, positive, negative, latent, calibration, margin_db=1.0, base_preset="auto", seed=0,
                steps=8, cfg=sd.CFG, scheduler=sd.SCHEDULER, top=15, observer=None, percentile=None,
                use_timestep_groups=None, smooth_alpha=None, smoothquant=None):
        if bridge.quantized_layers(model):
            raise OctetError("This MODEL is already quantized; connect the float MODEL to Static Attribution.")
        calibration.check_model(bridge.diffusion_model(model), bridge.architecture(model))
        # The static recipe Quantize Model will build (the same widgets, the same defaults).
        config = static_config("Static Attribution", observer, percentile, use_timestep_groups, smooth_alpha,
                               smoothquant)
        family = resolve_preset(base_preset, model)
        base = preset(family) if family else None
        dm = bridge.diffusion_model(model)
        result = sampling.with_states(model, positive, negative, latent, seed, steps, cfg, scheduler,
                             lambda ev, sig: attribute(dm, ev, sig, config, calibration))
        policy, chosen = auto_policy(result, margin_db, base=base)
        n_dyn = sum(c == "dynamic" for c in chosen.values())
        text = (f"static ({config.observer}, groups {config.timestep_groups}, SmoothQuant {config.smooth_alpha}) vs "
                f"dynamic per-token, each layer alone, {sum(result.states_per_group)} states; auto: {n_dyn} of "
                f"{len(chosen)} layers dynamic" + (f", preset {family} keeps its layers float" if family else "")
                + "\n\n" + result.table(top, chosen))
        return io.NodeOutput(policy, text)
