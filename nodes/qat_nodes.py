"""QAT Fine-tune: recover INT8 quality by distilling the quantized MODEL towards the float MODEL.

Data-free (EfficientDM): the float MODEL samples a few trajectories with the host's own KSampler
path while a forward hook records each denoiser call (inputs, output, sigma). The fake-quant twins
of the quantized layers are then swapped into the float model and trained, one recorded call per
step, to reproduce those outputs; at the end they are folded back into real INT8 layers and
installed as object patches on a clone of the quantized MODEL. Neither input MODEL is changed.
The core work is ``octet.qat``, the runs of the host's sampler ``nodes/sampling.finetune``; this
file declares the node.
"""
from __future__ import annotations

import logging

import comfy.samplers
import comfy.utils
from comfy_api.latest import io

from ..octet import config_for_mode, qat
from . import bridge, sampling
from .widgets import require_finite
from . import sampling_defaults as sd

log = logging.getLogger("octet")
FALLBACK_MODES = ("dynamic", "weight_only")


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
                io.Conditioning.Input("heldback_positive", optional=True,
                                      tooltip="Prompts QAT never trains on. The trained layers are kept only if they "
                                              "sample these (at a held-back seed) closer to the float MODEL than the "
                                              "INT8 MODEL did; otherwise its own layers come back. Unconnected: the "
                                              "training prompts at a held-back seed (does not catch over-fitting to "
                                              "your prompts)."),
                io.Combo.Input("mode", options=list(FALLBACK_MODES), default="dynamic", optional=True,
                               tooltip="Used only without 'quantized_model'. Static W8A8 needs a CALIBRATION: "
                                       "quantize with Quantize Model and connect its output instead."),
            ],
            outputs=[io.Model.Output(display_name="MODEL", tooltip="The INT8 MODEL with the learned layers."),
                     io.String.Output(display_name="loss_log", tooltip="Loss per logged step, before/after.")],
        )

    @classmethod
    def execute(cls, model, positive, negative, latent_image, seed, trajectories, steps, cfg, sampler_name,
                scheduler, train_steps, learning_rate, lora_rank, quantized_model=None, mode="dynamic",
                heldback_positive=None):
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

        out, _, text = sampling.finetune(model, quantized_model, positive, negative, latent_image, seed, steps, cfg,
                                         sampler_name, scheduler, trajectories, config, progress,
                                         heldback_positive=heldback_positive)
        return io.NodeOutput(out, text)
