"""Sampling drivers: every run of the host's own sampler that Octet makes (measurements and recipes).

  * ``ksampler`` / ``schedule``: the stock KSampler path (``nodes.common_ksampler``) and the sigmas
    it would use; every other driver here, and Evaluate/Profile, samples through them;
  * ``with_states`` / ``with_fixed_run``: the denoiser re-evaluated on the recorded (x, sigma) states
    of one float Euler trajectory (Sensitivity Policy, Static Attribution), so every measurement sees
    identical inputs, prepared by the host's CFG, conditioning and model_sampling;
  * ``calibrate``: Calibrate's run, activation statistics filed per timestep group;
  * ``finetune``: QAT Fine-tune's runs, teacher trajectories, distillation and held-back validation;
  * ``sample_schedule``: INT8 Sampler's chain of KSampler (Advanced) segments, float or INT8 each,
    timed per step.

Wrappers around the model's calls are installed through nodes/bridge.py (``set_apply_model_wrapper``,
``install_timestep_groups``); the octet core does the numbers.
"""
from __future__ import annotations

import hashlib
import logging
import time

import torch

from ..octet import qat
from ..octet.api import OctetError
from ..octet.calibration import coverage_notes, record, sampler_mismatch
from ..octet.fingerprint import module_fingerprint
from ..octet.metrics import db_gain
from ..octet.observers import DEFAULT_SAMPLE_CAP
from ..octet.timestep import GroupSelector
from . import bridge
from .progress import check_interrupt

log = logging.getLogger("octet")


# -- the host's sampler -----------------------------------------------------------------------------
def ksampler(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent, **options) -> dict:
    """The LATENT the stock KSampler returns (``options``: KSampler (Advanced)'s denoise, disable_noise,
    start_step, last_step, force_full_denoise)."""
    import nodes
    return nodes.common_ksampler(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent,
                                 **options)[0]


def schedule(model, steps, sampler_name, scheduler, denoise=1.0) -> torch.Tensor:
    """The sigmas KSampler samples ``model`` at with these settings."""
    import comfy.samplers
    return comfy.samplers.KSampler(model, steps, model.load_device, sampler_name, scheduler, denoise,
                                   model_options=model.model_options).sigmas


# -- fixed states (sensitivity, attribution) --------------------------------------------------------
def with_states(model, positive, negative, latent, seed, steps, cfg, scheduler, body):
    """Run ``body(evaluate, sigmas)`` inside the host sampler: ``evaluate(i)`` is the denoiser (host CFG and
    conditioning) at state i of one float Euler trajectory, the inputs the model really sees when sampling."""
    import comfy.sample
    import comfy.samplers
    latent_image = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    noise = comfy.sample.prepare_noise(latent_image, seed)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps).cpu()
    box = {}

    def sampler(denoiser, x, sigmas, extra_args=None, callback=None, disable=None):
        extra_args = extra_args or {}
        s_in = x.new_ones([x.shape[0]])
        states = []
        with torch.no_grad():
            for i in range(len(sigmas) - 1):
                states.append((x.clone(), sigmas[i]))
                d = denoiser(x, sigmas[i] * s_in, **extra_args)
                x = x + (x - d) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
        box["r"] = body(lambda i: denoiser(states[i][0], states[i][1] * s_in, **extra_args),
                        [float(s) for _, s in states])
        return x

    comfy.sample.sample_custom(model, noise, cfg, comfy.samplers.KSAMPLER(sampler), sigmas, positive,
                               negative if negative is not None else positive, latent_image, seed=seed)
    return box["r"]


def with_fixed_run(model, positive, negative, latent, seed, steps, cfg, scheduler, body):
    """``body(run)``: ``run()`` evaluates the denoiser at every recorded state, concatenated."""
    return with_states(model, positive, negative, latent, seed, steps, cfg, scheduler,
                       lambda evaluate, sigmas: body(lambda: torch.cat([evaluate(i) for i in range(len(sigmas))])))


# -- Calibrate ----------------------------------------------------------------------------------------
def _batch(conditioning) -> int:
    return max((c[0].shape[0] for c in conditioning), default=1)


def describe_conditioning(conditioning) -> dict:
    """What we can say about CONDITIONING without its text: shapes, distinct prompts, a short content hash."""
    h = hashlib.sha256()
    shapes, rows = [], set()
    for c in conditioning:
        shapes.append(list(c[0].shape))
        t = c[0].detach().float().cpu()
        h.update(t.numpy().tobytes()[:1 << 16])
        rows.update(hashlib.sha256(r.numpy().tobytes()).hexdigest() for r in t.reshape(t.shape[0], -1))
    return {"entries": len(conditioning), "shapes": shapes, "distinct": len(rows), "hash": h.hexdigest()[:16]}


def calibrate(model, positive, negative, latent_image, seed, steps, cfg, sampler_name, scheduler, groups,
              *, sample_cap: int = DEFAULT_SAMPLE_CAP):
    """Run real sampling with hooks on the float model; returns (Calibration, seconds).

    The host's own sampler (the stock KSampler path) samples a *clone* of the float MODEL that carries
    the timestep-group wrapper: before each diffusion-model call it puts the call's sigma into the
    selector, and forward pre-hooks on every Linear/Conv2d file the layer's input under that group.
    Hooks and wrapper are gone on return (also after an error); the source MODEL is untouched.
    """
    if bridge.quantized_layers(model):  # also unloads clones whose object patches sit in the shared model
        raise OctetError("This MODEL is already quantized. Calibrate the float MODEL (before Quantize Model).")
    dm = bridge.diffusion_model(model)
    selector = GroupSelector.from_sigmas(schedule(model, steps, sampler_name, scheduler).tolist(), groups)
    latent = dict(latent_image)
    batch = max(_batch(positive), _batch(negative))
    if latent["samples"].shape[0] < batch:  # one noise per prompt: ComfyUI draws it per batch index
        reps = -(-batch // latent["samples"].shape[0])
        latent["samples"] = latent["samples"].repeat(reps, 1, 1, 1)[:batch]
    clone = model.clone()
    # Cancel stops calibration between two model calls.
    bridge.install_timestep_groups(clone, selector, key="octet_calibrate", before_call=check_interrupt, record=False)
    info = {"sampler": {"seed": int(seed), "steps": int(steps), "cfg": float(cfg), "sampler": sampler_name,
                        "scheduler": scheduler, "batch": int(latent["samples"].shape[0]),
                        "latent_shape": list(latent["samples"].shape)},
            "conditioning": {"positive": describe_conditioning(positive),
                             "negative": describe_conditioning(negative)}}
    start = time.perf_counter()
    with record(dm, selector, sample_cap=sample_cap, architecture=bridge.architecture(model), info=info) as cal:
        ksampler(clone, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent)
    seconds = time.perf_counter() - start
    cal.info["seconds"] = round(seconds, 3)
    for note in coverage_notes(info["conditioning"]["positive"]):
        log.warning("Octet Calibrate: %s", note)
    unseen = [n for n, s in cal.layers.items() if int(s.calls.sum()) == 0]
    if unseen:
        log.warning("Octet: %d layers never ran during calibration (e.g. %s); static mode will refuse them "
                    "unless a policy keeps them in float.", len(unseen), unseen[:3])
    return cal, seconds


# -- QAT Fine-tune --------------------------------------------------------------------------------------
HOLDOUT_SEED_OFFSET = 1_000_003  # the held-back trajectory's seed = seed + this: far from seed + i of training


def _sigma_of(args, kwargs):
    # ComfyUI's calc_cond_batch puts the call's sigmas into transformer_options.
    return (kwargs.get("transformer_options") or {}).get("sigmas")


def _check_qat_inputs(fp_model, quantized) -> dict:
    """The quantized layers, after checking both MODELs fit together (clear errors otherwise)."""
    if bridge.quantized_layers(fp_model):  # also unloads clones whose patches sit in the shared model
        raise OctetError("The 'model' input is already quantized. Connect the float MODEL (the one you fed to "
                         "Quantize Model) to 'model', and the quantized one to 'quantized_model'.")
    layers = bridge.quantized_layers(quantized)
    if not layers:
        raise OctetError("'quantized_model' has no Octet INT8 layers: connect the output of Quantize Model "
                         "(or Load Quantized), or leave it unconnected to quantize with 'mode'.")
    info = bridge.octet_info(quantized)
    arch = info.get("architecture")
    if arch and arch != bridge.architecture(fp_model):
        raise OctetError(f"The quantized MODEL is a '{arch}' but the float MODEL a '{bridge.architecture(fp_model)}'. "
                         f"Connect the float model it was quantized from.")
    source = info.get("source_hash")
    if source and source != module_fingerprint(bridge.diffusion_model(fp_model)):
        raise OctetError("The quantized MODEL was made from other float weights (fingerprints differ). Connect "
                         "the float MODEL it was quantized from: the teacher must be the model it approximates.")
    return layers


def finetune(fp_model, quantized, positive, negative, latent_image, seed: int, steps: int, cfg: float,
             sampler_name: str, scheduler: str, trajectories: int, config: qat.QATConfig, progress=None,
             validate: bool = True, heldback_positive=None):
    """Record the teacher, distil, fold. Returns (new quantized MODEL, DistillResult, report text).

    Data-free (EfficientDM): the float MODEL samples a few trajectories with the host's own KSampler
    path while a forward hook records each denoiser call (inputs, output, sigma). The fake-quant twins
    of the quantized layers are then swapped into the float model and trained to reproduce those
    outputs; at the end they are folded back into real INT8 layers and installed as object patches on
    a clone of the quantized MODEL. Neither input MODEL is changed.

    ``validate`` (always on in the node): keep the trained layers only if the held-back seed improves. Off only
    in tests of the folding mechanics, on models whose held-back samples are noise (a random UNet).
    ``heldback_positive``: prompts the training never sees, sampled at the held-back seed for that verdict
    (default: the training prompts). A held-back seed alone does not catch over-fitting to the prompts:
    on the reference MMDiT, QAT of naive static W8A8 improved its held-back seed and lost 0.4 dB on other
    classes (issue 15).
    """
    import comfy.model_management as mm

    layers = _check_qat_inputs(fp_model, quantized)
    dm = bridge.diffusion_model(fp_model)
    start = time.perf_counter()
    teacher_model = fp_model.clone()
    # Recorded calls stay in CPU RAM (a few MB per step for SD-sized latents); training moves one at a time.
    with qat.record_teacher(dm, storage=mm.intermediate_device(), sigma_of=_sigma_of) as teacher:
        for i in range(trajectories):
            ksampler(teacher_model, seed + i, steps, cfg, sampler_name, scheduler, positive, negative, latent_image)
    # One more trajectory at a seed the training never sees: QAT keeps its result only if the error on these
    # held-back calls drops (issue 15: QAT scored on its own training calls handed back worse images).
    holdout_seed = seed + HOLDOUT_SEED_OFFSET
    # The verdict samples the held-back seed with the training prompts and, when given, with prompts the
    # training never sees; the trained layers must win on every one (the last one's calls are also the
    # per-call held-back set). Either alone misjudged a reference model (issue 15, docs/QUALITY.md).
    checks = [("training prompts", positive)]
    if heldback_positive is not None:
        checks.append(("held-back prompts", heldback_positive))
    held_float = {}
    with qat.record_teacher(dm, storage=mm.intermediate_device(), sigma_of=_sigma_of) as holdout:
        label, pos = checks[-1]
        held_float[label] = ksampler(teacher_model, holdout_seed, steps, cfg, sampler_name, scheduler, pos,
                                     negative, latent_image)["samples"]
    for label, pos in checks[:-1]:
        held_float[label] = ksampler(teacher_model, holdout_seed, steps, cfg, sampler_name, scheduler, pos,
                                     negative, latent_image)["samples"]
    teacher_seconds = time.perf_counter() - start
    # Train where the host put the float model (GPU if it fits there, else CPU).
    mm.load_models_gpu([teacher_model])
    device = next(dm.parameters()).device
    twins = qat.make_twins(layers, dm, config, device=device)
    result = qat.distill(dm, twins, teacher, config, device=device, progress=progress, holdout=holdout)
    homes = {name: layer.weight.device for name, layer in layers.items()}
    folded = {name: layer.to(homes[name]) for name, layer in qat.fold(twins).items()}
    del twins

    out = bridge.with_layers(quantized, folded)
    # The verdict that matters is the sample: per-call errors on the held-back trajectory can fall while the
    # sampled result drifts further (measured on the reference MMDiT, issue 15). Sample the held-back seed with
    # the PTQ MODEL and with the trained one, and keep the training only if its final latent is closer to float.
    def held_err(model, label, pos):
        got = ksampler(model, holdout_seed, steps, cfg, sampler_name, scheduler, pos, negative,
                       latent_image)["samples"]
        return float((got.float() - held_float[label].float()).square().mean())
    verdicts = {label: (held_err(quantized, label, pos), held_err(out, label, pos)) for label, pos in checks} \
        if validate else {}
    for label, (ptq, trained) in verdicts.items():
        result.log.append(f"held-back sample (seed {holdout_seed}, {label}, {steps} steps): final-latent MSE vs "
                          f"float PTQ {ptq:.6g} -> QAT {trained:.6g} ({db_gain(ptq, trained):+.2f} dB)")
    if not validate:
        result.log.append("held-back validation off: trained layers returned unchecked")
    sample_ptq, sample_qat = verdicts.get(checks[-1][0], (float("nan"), float("nan")))
    held_what = " and ".join(label for label, _ in checks)
    kept = validate and not (result.improved and all(trained < ptq for ptq, trained in verdicts.values()))
    if kept:
        # Fine-tuning must never hand back a worse model than it was given (e.g. a learning rate too
        # high for an already near-lossless W8A8 model, or training that over-fits its trajectories).
        out = quantized.clone()
        result.log.append(f"QAT did not lower the error on the held-back seed {holdout_seed} ({held_what}; calls and "
                          "sample): "
                          "the quantized MODEL's own layers are kept. Try a lower learning_rate, more "
                          "trajectories or more varied prompts.")
        log.warning("Octet QAT: no held-back improvement (calls %.4g -> %.4g, sample %.4g -> %.4g); returning the "
                    "PTQ layers.", result.eval_before, result.eval_after, sample_ptq, sample_qat)
    info = dict(bridge.octet_info(quantized))
    info["qat"] = {"steps": config.steps, "lr": config.lr, "lora_rank": config.lora_rank,
                   "weight_bits": config.weight_bits, "trajectories": trajectories, "sampler_steps": steps,
                   "heldback_seed": holdout_seed, "heldback_prompts": heldback_positive is not None,
                   "heldback_mse_before": result.eval_before,
                   "heldback_mse_after": result.eval_after, "heldback_sample_mse_ptq": sample_ptq,
                   "heldback_sample_mse_qat": sample_qat, "kept_ptq": kept,
                   "seconds": round(teacher_seconds + result.seconds, 2)}
    out.model_options[bridge.OPTIONS_KEY] = info
    text = "\n".join([f"teacher: {trajectories} trajectories x {steps} steps on the float MODEL, "
                      f"{len(teacher.calls)} denoiser calls in {teacher_seconds:.1f} s", result.text()])
    log.info("Octet QAT: held-back MSE %.4g -> %.4g in %.1f s", result.eval_before, result.eval_after, result.seconds)
    return out, result, text


# -- INT8 Sampler ------------------------------------------------------------------------------------
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


def _check_schedule_models(model, float_model, needs_float: bool) -> None:
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


class StepTimer:
    """Times each diffusion-model call of the clones it wraps and files it under its sigma."""

    def __init__(self):
        self.calls: list[tuple[float, float, str]] = []  # (sigma, seconds, precision)

    def wrap(self, patcher, precision: str):
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

        bridge.set_apply_model_wrapper(clone, TIMER_KEY, timed)
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


def sample_schedule(model, float_model, positive, negative, latent_image, seed, steps, cfg, sampler_name, scheduler,
                    denoise=1.0, float_first_steps=0, float_last_steps=0):
    """Run the precision schedule; returns (LATENT, report text).

    Chains the host's KSampler over step ranges, exactly as KSampler (Advanced) chains do: the first
    segment adds the noise, later ones continue with ``disable_noise`` and the last one finishes with
    ``force_full_denoise``. For deterministic samplers (euler, heun, dpmpp_2m, ...) the chain equals one
    uninterrupted run; ancestral/SDE samplers draw fresh noise per segment (same seed), as any
    KSampler (Advanced) chain does. Per-step time comes from a StepTimer on clones of both models.
    """
    segments = precision_schedule(steps, float_first_steps, float_last_steps)
    _check_schedule_models(model, float_model, any(p == "float" for p, _, _ in segments))
    timer = StepTimer()
    models = {"int8": timer.wrap(model, "int8")}
    if float_model is not None:
        models["float"] = timer.wrap(float_model, "float")
    latent = latent_image
    wall = time.perf_counter()
    for i, (precision, start, end) in enumerate(segments):
        single = len(segments) == 1
        latent = ksampler(models[precision], seed, steps, cfg, sampler_name, scheduler, positive, negative, latent,
                          denoise=denoise, disable_noise=i > 0, start_step=None if single else start,
                          last_step=None if single else end, force_full_denoise=i == len(segments) - 1)
    wall = time.perf_counter() - wall
    sigmas = schedule(model, steps, sampler_name, scheduler, denoise).cpu()
    notes = sampler_mismatch(bridge.octet_info(model).get("calibration"), steps, cfg, sampler_name, scheduler)
    for note in notes:
        log.warning("Octet INT8 Sampler: %s", note)
    text = schedule_report(segments, timer.per_step(sigmas), wall)
    return latent, "\n".join([text] + [f"WARNING: {n}" for n in notes])


def schedule_report(segments, rows, wall: float) -> str:
    lines = ["schedule: " + ", ".join(f"{p} steps {a}-{b - 1}" for p, a, b in segments),
             f"{'step':>4}  {'sigma':>9}  {'precision':<9} {'ms':>9}"]
    totals: dict[str, float] = {}
    for step, sigma, precision, seconds in rows:
        lines.append(f"{step:>4}  {sigma:>9.4f}  {precision:<9} {seconds * 1000:>9.1f}")
        totals[precision] = totals.get(precision, 0.0) + seconds
    lines.append("model time: " + ", ".join(f"{p} {t:.3f} s" for p, t in totals.items()) +
                 f"; total wall {wall:.3f} s")
    return "\n".join(lines)
