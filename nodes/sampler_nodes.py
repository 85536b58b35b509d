"""INT8 Sampler: a KSampler with a precision schedule over the steps.

Quantization error made in the first (high-noise) steps is carried through the whole trajectory,
and the last steps set fine detail; running just those steps with the float MODEL and the rest in
INT8 buys back quality at a small share of the time. The node chains the host's own KSampler over
step ranges, exactly as KSampler (Advanced) chains do, and times each step: that driver is
``nodes/sampling.sample_schedule``; this file declares the node.
"""
from __future__ import annotations

import comfy.samplers
from comfy_api.latest import io

from . import sampling
from .widgets import require_finite
from . import sampling_defaults as sd


class Int8Sampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="OctetInt8Sampler",
            display_name="INT8 Sampler",
            category="octet",
            description="KSampler for INT8 models with a precision schedule: run the first and/or last steps with "
                        "the float MODEL (against error accumulation), the rest in INT8. Reports per-step time.",
            inputs=[
                io.Model.Input("model", tooltip="The INT8 MODEL (Quantize Model or Load Quantized)."),
                io.Conditioning.Input("positive", tooltip="What to generate."),
                io.Conditioning.Input("negative", tooltip="What to steer away from (used when cfg > 1)."),
                io.Latent.Input("latent_image", tooltip="The latent to denoise (its size and batch)."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True,
                             tooltip="Noise seed (as KSampler)."),
                io.Int.Input("steps", default=sd.STEPS, min=1, max=10000, tooltip="Sampling steps (as KSampler)."),
                io.Float.Input("cfg", default=sd.CFG, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale (as KSampler)."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default=sd.SAMPLER,
                               tooltip="Sampling algorithm (as KSampler)."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default=sd.SCHEDULER,
                               tooltip="Noise schedule (as KSampler)."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Share of the schedule to run; < 1 keeps part of the input latent."),
                io.Int.Input("float_first_steps", default=1, min=0, max=10000,
                             tooltip="Steps at the start (highest noise) run with the float MODEL."),
                io.Int.Input("float_last_steps", default=0, min=0, max=10000,
                             tooltip="Steps at the end (finest detail) run with the float MODEL."),
                io.Model.Input("float_model", optional=True,
                               tooltip="The float MODEL the INT8 one was made from; needed when any step is float."),
            ],
            outputs=[io.Latent.Output(display_name="LATENT"),
                     io.String.Output(display_name="timing", tooltip="Per-step precision and time.")],
        )

    @classmethod
    def execute(cls, model, positive, negative, latent_image, seed, steps, cfg, sampler_name, scheduler, denoise,
                float_first_steps, float_last_steps, float_model=None):
        require_finite("INT8 Sampler", cfg=cfg, denoise=denoise)
        latent, text = sampling.sample_schedule(model, float_model, positive, negative, latent_image, seed, steps, cfg,
                                                sampler_name, scheduler, denoise, float_first_steps, float_last_steps)
        return io.NodeOutput(latent, text)
