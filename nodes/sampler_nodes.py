"""INT8 Sampler: a KSampler with a precision schedule over the steps.

Quantization error made in the first (high-noise) steps is carried through the whole trajectory,
and the last steps set fine detail; running just those steps with the float MODEL and the rest in
INT8 buys back quality at a small share of the time. The node chains the host's own
``nodes.common_ksampler`` over step ranges, exactly as KSampler (Advanced) chains do: the first
segment adds the noise, later ones continue with ``disable_noise`` and the last one finishes with
``force_full_denoise``. For deterministic samplers (euler, heun, dpmpp_2m, ...) the chain equals
one uninterrupted run; ancestral/SDE samplers draw fresh noise per segment (same seed), as any
KSampler (Advanced) chain does.

Per-step time comes from an APPLY_MODEL wrapper on clones of both models that times each
diffusion-model call and files it under the step whose sigma it ran at.
"""
from __future__ import annotations

import logging
import time

import comfy.samplers
import torch
from comfy_api.latest import io

from ..octet.api import OctetError
from ..octet.fingerprint import module_fingerprint
from . import bridge
from .widgets import require_finite
from . import sampling_defaults as sd

log = logging.getLogger("octet")

TIMER_KEY = "octet_step_timer"


def precision_schedule(steps: int, float_first: int, float_last: int) -> list[tuple[str, int, int]]:
    """[(precision, start_step, end_step)] covering 0..steps; precision is 'float' or 'int8'."""
    if float_first < 0 or float_last < 0:
        raise OctetError("float_first_steps and float_last_steps must be >= 0.")
    if float_first + float_last > steps:
        raise OctetError(f"float_first_steps + float_last_steps = {float_first + float_last} exceeds steps = "
                         f"{steps}; lower them (all-float sampling is plain KSampler with the float MODEL).")
    segments = [("float", 0, float_first), ("int8", float_first, steps - float_last),
                ("float", steps - float_last, steps)]
    return [s for s in segments if s[2] > s[1]]


def _check_models(model, float_model, needs_float: bool) -> None:
    if not bridge.quantized_layers(model):
        raise OctetError("The 'model' input is not quantized: connect the output of Quantize Model or Load "
                         "Quantized (and the float MODEL to 'float_model').")
    if not needs_float:
        return
    if float_model is None:
        raise OctetError("float_first_steps/float_last_steps > 0 need the float MODEL: connect it to 'float_model' "
                         "(or set both to 0 to sample in INT8 only).")
    if bridge.quantized_layers(float_model):
        raise OctetError("'float_model' is quantized: connect the float MODEL (the input of Quantize Model).")
    source = bridge.octet_info(model).get("source_hash")
    if source and source != module_fingerprint(bridge.diffusion_model(float_model)):
        raise OctetError("'float_model' is not the model the INT8 model was made from (weights fingerprint "
                         "differs). Connect the same float MODEL you quantized.")


class _StepTimer:
    def __init__(self):
        self.calls: list[tuple[float, float, str]] = []  # (sigma, seconds, precision)

    def wrap(self, patcher, precision: str):
        import comfy.patcher_extension
        clone = patcher.clone()

        def timed(executor, x, t, *args, **kwargs):
            sync = x.is_cuda and torch.cuda.is_available()
            if sync:
                torch.cuda.synchronize(x.device)
            start = time.perf_counter()
            out = executor(x, t, *args, **kwargs)
            if sync:
                torch.cuda.synchronize(x.device)
            self.calls.append((float(t.detach().float().max()), time.perf_counter() - start, precision))
            return out

        clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, TIMER_KEY, timed)
        return clone

    def per_step(self, sigmas: torch.Tensor) -> list[tuple[int, float, str, float]]:
        """(step, sigma, precision, seconds) with each call filed under the step whose interval holds its sigma."""
        s = sigmas.tolist()
        rows: dict[int, list] = {}
        for sigma, seconds, precision in self.calls:
            step = next((i for i in range(len(s) - 1) if s[i] >= sigma > s[i + 1] or abs(s[i] - sigma) < 1e-6),
                        len(s) - 2)
            row = rows.setdefault(step, [s[step], precision, 0.0])
            row[2] += seconds
        return [(i, r[0], r[1], r[2]) for i, r in sorted(rows.items())]


def sample(model, float_model, positive, negative, latent_image, seed, steps, cfg, sampler_name, scheduler,
           denoise=1.0, float_first_steps=0, float_last_steps=0):
    """Run the precision schedule; returns (LATENT, report text)."""
    import nodes

    schedule = precision_schedule(steps, float_first_steps, float_last_steps)
    _check_models(model, float_model, any(p == "float" for p, _, _ in schedule))
    timer = _StepTimer()
    models = {"int8": timer.wrap(model, "int8")}
    if float_model is not None:
        models["float"] = timer.wrap(float_model, "float")
    latent = latent_image
    wall = time.perf_counter()
    for i, (precision, start, end) in enumerate(schedule):
        single = len(schedule) == 1
        latent = nodes.common_ksampler(models[precision], seed, steps, cfg, sampler_name, scheduler, positive,
                                       negative, latent, denoise=denoise, disable_noise=i > 0,
                                       start_step=None if single else start, last_step=None if single else end,
                                       force_full_denoise=i == len(schedule) - 1)[0]
    wall = time.perf_counter() - wall
    sigmas = comfy.samplers.KSampler(model, steps, model.load_device, sampler_name, scheduler, denoise,
                                     model_options=model.model_options).sigmas.cpu()
    from .calibrate_nodes import sampler_mismatch
    notes = sampler_mismatch(bridge.octet_info(model).get("calibration"), steps, cfg, sampler_name, scheduler)
    for note in notes:
        log.warning("Octet INT8 Sampler: %s", note)
    text = report(schedule, timer.per_step(sigmas), wall)
    return latent, "\n".join([text] + [f"WARNING: {n}" for n in notes])


def report(schedule, rows, wall: float) -> str:
    lines = ["schedule: " + ", ".join(f"{p} steps {a}-{b - 1}" for p, a, b in schedule),
             f"{'step':>4}  {'sigma':>9}  {'precision':<9} {'ms':>9}"]
    totals: dict[str, float] = {}
    for step, sigma, precision, seconds in rows:
        lines.append(f"{step:>4}  {sigma:>9.4f}  {precision:<9} {seconds * 1000:>9.1f}")
        totals[precision] = totals.get(precision, 0.0) + seconds
    lines.append("model time: " + ", ".join(f"{p} {t:.3f} s" for p, t in totals.items()) +
                 f"; total wall {wall:.3f} s")
    return "\n".join(lines)


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
        latent, text = sample(model, float_model, positive, negative, latent_image, seed, steps, cfg, sampler_name,
                              scheduler, denoise, float_first_steps, float_last_steps)
        return io.NodeOutput(latent, text)
