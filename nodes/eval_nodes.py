"""Evaluate (FP vs INT8 at the same seeds: quality, speed, memory, size) and Profile (per-layer cost)."""
from __future__ import annotations

import comfy.samplers
from comfy_api.latest import io

from . import evaluate, plotting
from .widgets import require_finite
from . import sampling_defaults as sd


def _sampler_inputs():
    return [io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF,
                         tooltip="Noise seed; both models get the same noise, one image per batch index."),
            io.Int.Input("steps", default=sd.STEPS, min=1, max=1000, tooltip="Sampling steps for both models."
                                                                              + sd.MATCH_TIP),
            io.Float.Input("cfg", default=sd.CFG, min=0.0, max=100.0, step=0.1,
                           tooltip="Classifier-free guidance scale for both models." + sd.MATCH_TIP),
            io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default=sd.SAMPLER,
                           tooltip="Sampling algorithm for both models." + sd.MATCH_TIP),
            io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default=sd.SCHEDULER,
                           tooltip="Noise schedule for both models." + sd.MATCH_TIP)]


class Evaluate(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="OctetEvaluate",
            display_name="Evaluate INT8 vs FP",
            category="octet/eval",
            description="Sample the float and the quantized MODEL with the same seeds through KSampler; report "
                        "PSNR/SSIM of each image vs its FP twin, FID between the sets (reference models, >= 16 "
                        "images), ms per step, peak memory and size; draw a side-by-side grid and a "
                        "quality/speed/size chart from the measured numbers.",
            inputs=[io.Model.Input("fp_model", tooltip="The float MODEL (the reference)."),
                    io.Model.Input("quant_model", tooltip="The quantized MODEL (from Quantize Model / Load Quantized)."),
                    io.Conditioning.Input("positive", tooltip="What to generate (both models)."),
                    io.Conditioning.Input("negative", tooltip="Negative conditioning (both models)."),
                    io.Latent.Input("latent_image", tooltip="Its batch size is the number of images (seeds) compared."),
                    *_sampler_inputs(),
                    io.Vae.Input("vae", optional=True,
                                 tooltip="Decode to pixels for non-reference models; without it latents are compared.")],
            outputs=[io.String.Output(display_name="report"), io.Image.Output(display_name="grid"),
                     io.Image.Output(display_name="chart")],
        )

    @classmethod
    def execute(cls, fp_model, quant_model, positive, negative, latent_image, seed, steps, cfg, sampler_name,
                scheduler, vae=None):
        require_finite("Evaluate INT8 vs FP", cfg=cfg)
        args = (positive, negative, latent_image, seed, steps, cfg, sampler_name, scheduler)
        fp = evaluate.sample_run(fp_model, *args)
        q = evaluate.sample_run(quant_model, *args)
        fp_img, space = evaluate.to_images(fp_model, fp.latents, vae)
        rng = (fp.latents.amin(), fp.latents.amax())
        q_img, _ = evaluate.to_images(fp_model, q.latents, vae, ref_range=rng)
        cmp = evaluate.compare(fp_img, q_img, fid_features=evaluate.is_reference(fp_model))
        mb = 2 ** 20
        lines = [f"Evaluate: {cmp['n']} images, {steps} steps {sampler_name}/{scheduler}, cfg {cfg}, seed {seed}; "
                 f"compared in {space}",
                 f"PSNR vs FP  {cmp['psnr']:.2f} dB",
                 f"SSIM vs FP  {cmp['ssim']:.4f}" if cmp["ssim"] is not None else "SSIM vs FP  n/a (image < 11 px)",
                 f"FID vs FP   {cmp['fid']:.3f} (Octet Fashion-MNIST classifier features)" if cmp["fid"] is not None
                 else f"FID vs FP   n/a (needs an Octet reference model and >= {evaluate.FID_MIN_SAMPLES} images)",
                 f"{'':<8}{'ms/step':>10}{'peak MiB':>10}{'size MiB':>10}",
                 f"{'FP':<8}{fp.ms_per_step:>10.1f}{fp.peak.bytes / mb:>10.1f}{fp.size_bytes / mb:>10.2f}",
                 f"{'INT8':<8}{q.ms_per_step:>10.1f}{q.peak.bytes / mb:>10.1f}{q.size_bytes / mb:>10.2f}",
                 f"speed-up x{fp.seconds / max(q.seconds, 1e-9):.2f}, size x{q.size_bytes / max(fp.size_bytes, 1):.3f}; "
                 f"peak memory is {fp.peak.kind} (first run of a MODEL includes loading it)"]
        chart = plotting.quality_speed_size_chart([
            {"label": "FP", "ms_per_step": fp.ms_per_step, "psnr": float("inf"), "size_mb": fp.size_bytes / mb},
            {"label": "INT8", "ms_per_step": q.ms_per_step, "psnr": cmp["psnr"], "size_mb": q.size_bytes / mb}])
        grid = plotting.grid([fp_img, q_img, (fp_img - q_img).abs() * 4], ["FP", "INT8", "|diff|x4"])
        return io.NodeOutput("\n".join(lines), grid, chart)


class Profile(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="OctetProfile",
            display_name="Profile Model (per layer)",
            category="octet/eval",
            description="Time and memory of each layer of a MODEL during one sampling step (through KSampler): "
                        "which layers cost most. Self time per module, parameter and output bytes.",
            inputs=[io.Model.Input("model", tooltip="The MODEL to profile (float or INT8)."),
                    io.Conditioning.Input("positive", tooltip="Conditioning for the profiled step."),
                    io.Conditioning.Input("negative", tooltip="Negative conditioning (used when cfg != 1)."),
                    io.Latent.Input("latent_image", tooltip="Latent size and batch of the profiled step."),
                    io.Float.Input("cfg", default=1.0, min=0.0, max=100.0, step=0.1,
                                   tooltip="1.0 = one model call per step; otherwise two (CFG)."),
                    io.Int.Input("top", default=20, min=1, max=200, tooltip="Rows in the table and chart.")],
            outputs=[io.String.Output(display_name="table"), io.Image.Output(display_name="chart")],
        )

    @classmethod
    def execute(cls, model, positive, negative, latent_image, cfg, top):
        require_finite("Profile Model", cfg=cfg)
        _, table, chart = evaluate.profile_step(model, positive, negative, latent_image, cfg=cfg, top=top)
        return io.NodeOutput(table, chart)
