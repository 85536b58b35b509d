"""QAT Fine-tune: recover INT8 quality by distilling the quantized MODEL towards the float MODEL.

Data-free (EfficientDM): the float MODEL samples a few trajectories with the host's own KSampler
path (``nodes.common_ksampler``) while a forward hook records each denoiser call (inputs, output,
sigma). The fake-quant twins of the quantized layers are then swapped into the float model and
trained, one recorded call per step, to reproduce those outputs; at the end they are folded back
into real INT8 layers and installed as object patches on a clone of the quantized MODEL. Neither
input MODEL is changed. The core work is ``octet.qat``; this file only talks to the host.
"""
from __future__ import annotations

import logging
import time

import comfy.samplers
import comfy.utils
from comfy_api.latest import io

from ..octet import config_for_mode, qat
from ..octet.api import OctetError
from ..octet.fingerprint import module_fingerprint
from ..octet.metrics import db_gain
from . import bridge
from .widgets import require_finite
from . import sampling_defaults as sd

log = logging.getLogger("octet")
FALLBACK_MODES = ("dynamic", "weight_only")
HOLDOUT_SEED_OFFSET = 1_000_003  # the held-back trajectory's seed = seed + this: far from seed + i of training


def _sigma_of(args, kwargs):
    # ComfyUI's calc_cond_batch puts the call's sigmas into transformer_options.
    return (kwargs.get("transformer_options") or {}).get("sigmas")


def _check_inputs(fp_model, quantized) -> dict:
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
             validate: bool = True):
    """Record the teacher, distil, fold. Returns (new quantized MODEL, DistillResult, report text).

    ``validate`` (always on in the node): keep the trained layers only if the held-back seed improves. Off only
    in tests of the folding mechanics, on models whose held-back samples are noise (a random UNet).
    """
    import comfy.model_management as mm
    import nodes

    layers = _check_inputs(fp_model, quantized)
    dm = bridge.diffusion_model(fp_model)
    start = time.perf_counter()
    teacher_model = fp_model.clone()
    # Recorded calls stay in CPU RAM (a few MB per step for SD-sized latents); training moves one at a time.
    with qat.record_teacher(dm, storage=mm.intermediate_device(), sigma_of=_sigma_of) as teacher:
        for i in range(trajectories):
            nodes.common_ksampler(teacher_model, seed + i, steps, cfg, sampler_name, scheduler, positive, negative,
                                  latent_image)
    # One more trajectory at a seed the training never sees: QAT keeps its result only if the error on these
    # held-back calls drops (issue 15: QAT scored on its own training calls handed back worse images).
    holdout_seed = seed + HOLDOUT_SEED_OFFSET
    with qat.record_teacher(dm, storage=mm.intermediate_device(), sigma_of=_sigma_of) as holdout:
        held_float = nodes.common_ksampler(teacher_model, holdout_seed, steps, cfg, sampler_name, scheduler, positive,
                                           negative, latent_image)[0]["samples"]
    teacher_seconds = time.perf_counter() - start
    # Train where the host put the float model (GPU if it fits there, else CPU).
    mm.load_models_gpu([teacher_model])
    device = next(dm.parameters()).device
    twins = qat.make_twins(layers, dm, config, device=device)
    result = qat.distill(dm, twins, teacher, config, device=device, progress=progress, holdout=holdout)
    homes = {name: layer.weight.device for name, layer in layers.items()}
    folded = {name: layer.to(homes[name]) for name, layer in qat.fold(twins).items()}
    del twins

    out = quantized.clone()
    for name, layer in folded.items():
        out.add_object_patch(bridge.PREFIX + name, layer)
    # The verdict that matters is the sample: per-call errors on the held-back trajectory can fall while the
    # sampled result drifts further (measured on the reference MMDiT, issue 15). Sample the held-back seed with
    # the PTQ MODEL and with the trained one, and keep the training only if its final latent is closer to float.
    def held_err(model):
        got = nodes.common_ksampler(model, holdout_seed, steps, cfg, sampler_name, scheduler, positive, negative,
                                    latent_image)[0]["samples"]
        return float((got.float() - held_float.float()).square().mean())
    sample_ptq, sample_qat = (held_err(quantized), held_err(out)) if validate else (float("nan"), float("nan"))
    result.log.append(f"held-back sample (seed {holdout_seed}, {steps} steps): final-latent MSE vs float "
                      f"PTQ {sample_ptq:.6g} -> QAT {sample_qat:.6g} ({db_gain(sample_ptq, sample_qat):+.2f} dB)"
                      if validate else "held-back validation off: trained layers returned unchecked")
    kept = validate and not (result.improved and sample_qat < sample_ptq)
    if kept:
        # Fine-tuning must never hand back a worse model than it was given (e.g. a learning rate too
        # high for an already near-lossless W8A8 model, or training that over-fits its trajectories).
        out = quantized.clone()
        result.log.append(f"QAT did not lower the error on the held-back seed {holdout_seed} (calls and sample): "
                          "the quantized MODEL's own layers are kept. Try a lower learning_rate, more "
                          "trajectories or more varied prompts.")
        log.warning("Octet QAT: no held-back improvement (calls %.4g -> %.4g, sample %.4g -> %.4g); returning the "
                    "PTQ layers.", result.eval_before, result.eval_after, sample_ptq, sample_qat)
    info = dict(bridge.octet_info(quantized))
    info["qat"] = {"steps": config.steps, "lr": config.lr, "lora_rank": config.lora_rank,
                   "weight_bits": config.weight_bits, "trajectories": trajectories, "sampler_steps": steps,
                   "heldback_seed": holdout_seed, "heldback_mse_before": result.eval_before,
                   "heldback_mse_after": result.eval_after, "heldback_sample_mse_ptq": sample_ptq,
                   "heldback_sample_mse_qat": sample_qat, "kept_ptq": kept,
                   "seconds": round(teacher_seconds + result.seconds, 2)}
    out.model_options[bridge.OPTIONS_KEY] = info
    text = "\n".join([f"teacher: {trajectories} trajectories x {steps} steps on the float MODEL, "
                      f"{len(teacher.calls)} denoiser calls in {teacher_seconds:.1f} s", result.text()])
    log.info("Octet QAT: held-back MSE %.4g -> %.4g in %.1f s", result.eval_before, result.eval_after, result.seconds)
    return out, result, text


class QATFineTune(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="OctetQATFineTune",
            display_name="QAT Fine-tune (INT8)",
            category="octet",
            description="Quantization-aware fine-tuning without data: the float MODEL samples a few trajectories, "
                        "and the INT8 layers' scales (plus a small LoRA per layer) are trained to reproduce its "
                        "denoiser outputs, then folded back into real INT8 layers. Inputs are not changed.",
            inputs=[
                io.Model.Input("model", tooltip="The float MODEL: the teacher, and the source of the float weights."),
                io.Conditioning.Input("positive", tooltip="Prompts for the teacher's trajectories: use the kind of "
                                                          "prompts you will generate (a batch covers more ground)."),
                io.Conditioning.Input("negative", tooltip="Negative prompt for the teacher's trajectories (as you "
                                                          "will sample)."),
                io.Latent.Input("latent_image", tooltip="Size of the training latents (small is fine and faster)."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff,
                             tooltip="Noise seed of the first trajectory; trajectory i uses seed + i."),
                io.Int.Input("trajectories", default=2, min=1, max=64,
                             tooltip="How many teacher samplings (seeds) to record. More = more varied data."),
                io.Int.Input("steps", default=sd.STEPS, min=1, max=1000,
                             tooltip="Sampler steps per trajectory: each step gives training inputs at one sigma."),
                io.Float.Input("cfg", default=sd.CFG, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="CFG of the teacher's trajectories (use the one you will sample with)."
                                       + sd.MATCH_TIP),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default=sd.SAMPLER,
                               tooltip="Sampler of the teacher's trajectories." + sd.MATCH_TIP),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default=sd.SCHEDULER,
                               tooltip="Scheduler of the teacher's trajectories: it sets the sigmas trained on."
                                       + sd.MATCH_TIP),
                io.Int.Input("train_steps", default=200, min=0, max=100000,
                             tooltip="Optimizer steps; each one trains on one recorded denoiser call."),
                io.Float.Input("learning_rate", default=1e-3, min=1e-6, max=1.0, step=1e-5, round=1e-6,
                               tooltip="Adam learning rate for the log-scales and LoRA (cosine decay to 10%)."),
                io.Int.Input("lora_rank", default=4, min=0, max=64,
                             tooltip="Rank of the low-rank correction added to each weight before quantization "
                                     "(merged into the int8 weights at the end). 0 = learn scales only."),
                io.Model.Input("quantized_model", optional=True,
                               tooltip="The INT8 MODEL to improve (from Quantize Model, e.g. with a policy or a "
                                       "CALIBRATION). If unconnected, 'model' is quantized with 'mode'."),
                io.Combo.Input("mode", options=list(FALLBACK_MODES), default="dynamic", optional=True,
                               tooltip="Used only without 'quantized_model'. Static W8A8 needs a CALIBRATION: "
                                       "quantize with Quantize Model and connect its output instead."),
            ],
            outputs=[io.Model.Output(display_name="MODEL", tooltip="The INT8 MODEL with the learned layers."),
                     io.String.Output(display_name="loss_log", tooltip="Loss per logged step, before/after.")],
        )

    @classmethod
    def execute(cls, model, positive, negative, latent_image, seed, trajectories, steps, cfg, sampler_name,
                scheduler, train_steps, learning_rate, lora_rank, quantized_model=None, mode="dynamic"):
        require_finite("QAT Fine-tune", cfg=cfg, learning_rate=learning_rate)
        import comfy.model_management as mm

        if quantized_model is None:
            quantized_model, _ = bridge.quantize_model(model, config_for_mode(mode))
        config = qat.QATConfig(steps=train_steps, lr=learning_rate, lora_rank=lora_rank, seed=seed & 0x7FFFFFFF,
                               log_every=max(1, train_steps // 20))
        bar = comfy.utils.ProgressBar(max(1, train_steps))

        def progress(step, total, loss):
            mm.throw_exception_if_processing_interrupted()  # Cancel works mid-training
            bar.update_absolute(step, total)
            if step % config.log_every == 0 or step == total:
                log.info("Octet QAT step %d/%d: loss %.5g", step, total, loss)

        out, _, text = finetune(model, quantized_model, positive, negative, latent_image, seed, steps, cfg,
                                sampler_name, scheduler, trajectories, config, progress)
        return io.NodeOutput(out, text)
