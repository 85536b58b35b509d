"""Static W8A8 quality on the embedded tiny model and an outlier twin; writes docs/QUALITY_calibration.md.

Stand-in for the bench/quality.py rows of issue 4 until trained reference models exist (issue 9):
PSNR of the final latent against the float model at the same seed, through the host's stock
KSampler path. The twin plants activation outliers without changing the float function: a few
channels of a GroupNorm's affine weight (and bias) are multiplied by ~30 and the consuming
layer's matching input columns divided by the same factor, so the float model samples the same
latents while its INT8 inputs get a handful of loud channels, as real UNets/DiTs have.

Also measures calibration overhead: calibrated sampling time / plain sampling time (min of
interleaved repeats, to be fair on a busy machine).

Run: python bench/calibration_quality.py [--steps 10] [--size 16] [--seeds 3]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


sys.path.insert(0, os.path.join(ROOT, "scripts"))
import octet_pack  # noqa: E402

octet_pack.load(comfy=True)
import comfy.utils  # noqa: E402
import nodes  # noqa: E402
import torch  # noqa: E402

from comfyui_octet.nodes import bridge, calibrate_nodes, sampling  # noqa: E402

from comfyui_octet.fixtures import reference_model
from comfyui_octet.octet import DynamicW8A8Config, StaticW8A8Config  # noqa: E402
from comfyui_octet.octet.metrics import tensor_psnr  # noqa: E402

comfy.utils.PROGRESS_BAR_ENABLED = False
OUTLIER_GAIN = 30.0


def plant_outliers(patcher, gain=OUTLIER_GAIN, channels=3, seed=0):
    """Function-preserving outliers: GroupNorm -> 1x1 proj_in of every SpatialTransformer.

    norm(x) * g + b feeds proj_in; scaling g_j, b_j by c and proj_in's input column j by 1/c keeps
    proj_in's output identical (up to float rounding) while its input channel j becomes c x louder.
    """
    dm = bridge.diffusion_model(patcher)
    gen = torch.Generator().manual_seed(seed)
    planted = 0
    with torch.no_grad():
        for name, m in dm.named_modules():
            if type(m).__name__ == "SpatialTransformer":
                idx = torch.randperm(m.norm.weight.numel(), generator=gen)[:channels]
                m.norm.weight[idx] *= gain
                m.norm.bias[idx] *= gain
                m.proj_in.weight[:, idx] /= gain
                planted += 1
    assert planted, "no SpatialTransformer found"
    return patcher


def run(model_name, model, args):
    pos = reference_model.tiny_conditioning(batch=1, seed=1)
    neg = reference_model.tiny_conditioning(batch=1, seed=2)
    latent = {"samples": torch.zeros(1, 4, args.size, args.size)}
    common = dict(steps=args.steps, cfg=args.cfg, sampler_name="euler", scheduler="normal")

    def sample(m, seed):
        return nodes.common_ksampler(m, seed, args.steps, args.cfg, "euler", "normal", pos, neg, latent)[0]["samples"]

    seeds = list(range(100, 100 + args.seeds))
    refs = {s: sample(model, s) for s in seeds}

    # Calibration: a different seed and a batch of conditionings from the prompt-free set.
    cal_pos = reference_model.tiny_conditioning(batch=args.cal_batch, seed=11)
    cal_neg = reference_model.tiny_conditioning(batch=args.cal_batch, seed=12)
    cal_lat = {"samples": torch.zeros(args.cal_batch, 4, args.size, args.size)}
    cals = {}
    for groups in (1, args.groups):
        cals[groups], _ = calibrate_nodes.calibrate(model, cal_pos, cal_neg, cal_lat, 7, args.steps, args.cfg,
                                                    "euler", "normal", groups)

    def row(label, q, sampler_schedule=None):
        vals = []
        for s in seeds:
            if sampler_schedule is None:
                out = sample(q, s)
            else:
                out = sampling.sample_schedule(q, model, pos, neg, latent, s, args.steps, args.cfg, "euler",
                                               "normal", 1.0, *sampler_schedule)[0]["samples"]
            vals.append(tensor_psnr(refs[s], out, peak="absmax"))
        return (model_name, label, sum(vals) / len(vals))

    rows = []
    q, _ = bridge.quantize_model(model, DynamicW8A8Config())
    rows.append(row("dynamic per-token (reference)", q))
    variants = [
        ("naive static per-tensor (minmax, 1 group)", 1, dict(observer="minmax", timestep_groups=False)),
        ("static calibrated (percentile 99.99, 1 group)", 1, dict(observer="percentile", timestep_groups=False)),
        ("static calibrated (mse, 1 group)", 1, dict(observer="mse", timestep_groups=False)),
        (f"+ timestep groups ({args.groups}, mse)", args.groups, dict(observer="mse", timestep_groups=True)),
        (f"+ timestep groups ({args.groups}, minmax)", args.groups, dict(observer="minmax", timestep_groups=True)),
        ("+ SmoothQuant a=0.5 (mse, groups)", args.groups, dict(observer="mse", timestep_groups=True,
                                                               smooth_alpha=0.5)),
        ("+ SmoothQuant a=0.5 (minmax, groups)", args.groups, dict(observer="minmax", timestep_groups=True,
                                                                  smooth_alpha=0.5)),
        ("+ SmoothQuant a=0.8 (mse, groups)", args.groups, dict(observer="mse", timestep_groups=True,
                                                               smooth_alpha=0.8)),
    ]
    best = None
    for label, groups, cfg in variants:
        q, _ = bridge.quantize_model(model, StaticW8A8Config(**cfg), calibration=cals[groups])
        rows.append(row(label, q))
        if "SmoothQuant a=0.5 (mse" in label:
            best = q
    rows.append(row("INT8 Sampler: best static + float first 1 step", best, (1, 0)))
    rows.append(row("INT8 Sampler: best static + float first 1 + last 1", best, (1, 1)))
    return rows


def overhead(model, args, repeats=3):
    pos = reference_model.tiny_conditioning(batch=1, seed=1)
    neg = reference_model.tiny_conditioning(batch=1, seed=2)
    latent = {"samples": torch.zeros(1, 4, args.size, args.size)}
    plain, cal = [], []
    nodes.common_ksampler(model, 0, args.steps, args.cfg, "euler", "normal", pos, neg, latent)  # warm up
    for _ in range(repeats):
        t = time.perf_counter()
        nodes.common_ksampler(model, 0, args.steps, args.cfg, "euler", "normal", pos, neg, latent)
        plain.append(time.perf_counter() - t)
        t = time.perf_counter()
        calibrate_nodes.calibrate(model, pos, neg, latent, 0, args.steps, args.cfg, "euler", "normal", args.groups)
        cal.append(time.perf_counter() - t)
    return min(plain), min(cal)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--size", type=int, default=16)
    p.add_argument("--cfg", type=float, default=4.0)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--cal-batch", type=int, default=4)
    p.add_argument("--out", default=os.path.join(ROOT, "docs", "QUALITY_calibration.md"))
    args = p.parse_args()

    base = reference_model.build_tiny_sd15()
    twin = plant_outliers(reference_model.build_tiny_sd15())
    rows = run("tiny", base, args) + run("tiny+outliers", twin, args)
    t_plain, t_cal = overhead(base, args)
    t_plain_big, t_cal_big = overhead(base, argparse.Namespace(**{**vars(args), "size": 64}))

    lines = ["# Static W8A8 quality (calibration, timestep groups, SmoothQuant)", "",
             f"Generated by `bench/calibration_quality.py` on {torch.__version__} / "
             f"{'CUDA' if torch.cuda.is_available() else 'CPU'}: euler, {args.steps} steps, cfg {args.cfg}, "
             f"{args.size}x{args.size} latent, mean over {args.seeds} seeds; calibration on a batch of "
             f"{args.cal_batch} other conditionings and another seed. PSNR of the final latent vs the float "
             "model at the same seed (higher is better). The models are the embedded tiny SD1.5-architecture "
             "UNet with random weights, and a twin with planted, function-preserving activation outliers "
             f"(x{OUTLIER_GAIN:g} on 3 channels of every SpatialTransformer's proj_in input). Trained reference "
             "models (issue 9) and SSIM/FID rows are still to come.", "",
             "| model | variant | PSNR dB |", "|---|---|---:|"]
    lines += [f"| {m} | {label} | {v:.2f} |" for m, label, v in rows]
    lines += ["", "## Calibration overhead", "",
              "| latent | plain sampling s | calibrating s | ratio |", "|---|---:|---:|---:|",
              f"| {args.size}x{args.size} | {t_plain:.3f} | {t_cal:.3f} | {t_cal / t_plain:.2f}x |",
              f"| 64x64 | {t_plain_big:.3f} | {t_cal_big:.3f} | {t_cal_big / t_plain_big:.2f}x |", ""]
    text = "\n".join(lines)
    print(text)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
