"""What limits static W8A8 on the reference models, and what the per-layer "auto" choice recovers.

    .venv/bin/python bench/attribution.py [--models mmdit dit unet] [--variants plain twin] [--samples 20]

Per model: calibrate the FP model (bench/quality.py's calibration run: 8 images, seed 999), record the
states (x, sigma) of one float Euler trajectory (seed 4321, 2 images of classes the scored images
also use, CFG as sampled), and measure every layer alone as static (the recipe's: mse observer, 4 timestep
groups, SmoothQuant 0.5) and as dynamic per-token with the same SmoothQuant: output MSE per timestep group (a model-output proxy),
with the calibration statistics that explain it, plus the activation range per class (FP, cfg 1, one
image per class). ``octet.attribution.auto_policy`` then keeps static where it is within 1 dB of dynamic
and makes the rest dynamic; the scored rows are image PSNR vs FP on bench/quality.py's images (classes
cycle 0-9, seed --seed, euler --steps, cfg --cfg). Writes docs/QUALITY_attribution.md.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import quality  # noqa: E402  (loads the pack and the host)
import torch  # noqa: E402

from comfyui_octet.nodes import bridge, evaluate  # noqa: E402

from comfyui_octet.fixtures import reference_model as rm
from comfyui_octet.octet import DynamicW8A8Config, StaticW8A8Config  # noqa: E402
from comfyui_octet.octet.attribution import attribute, auto_policy  # noqa: E402
from comfyui_octet.nodes.policy_nodes import detect_preset  # noqa: E402
from comfyui_octet.octet.presets import preset  # noqa: E402

RECIPE_STATIC = StaticW8A8Config(observer="mse", timestep_groups=True, smooth_alpha=0.5)
MARGIN_DB = 1.0


def class_ranges(fp, kind, args, names):
    """Per layer: absmax of its input per class (FP, cfg 1 so the batch is the ten conditional rows)."""
    import nodes
    dm = bridge.diffusion_model(fp)
    per = {n: torch.zeros(10) for n in names}
    hooks = []
    for n in names:
        def hook(mod, a, n=n):
            x = a[0].detach().float().abs()
            rows = x.reshape(x.shape[0], -1).amax(1)
            if rows.numel() == 10:
                per[n] = torch.maximum(per[n], rows)
        hooks.append(dm.get_submodule(n).register_forward_pre_hook(hook))
    try:
        nodes.common_ksampler(fp, 4321, args.steps, 1.0, "euler", "normal", rm.batch_conditioning(kind, range(10)),
                              rm.class_conditioning(kind, "unconditional", batch=10), rm.empty_latent(kind, 10))
    finally:
        for h in hooks:
            h.remove()
    return per


def score(fp, q, sargs, ref_img):
    img, _ = evaluate.to_images(fp, evaluate.sample_run(q, *sargs).latents)
    return evaluate.compare(ref_img, img, fid_features=False)["psnr"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=["mmdit"], choices=list(rm.SPECS))
    ap.add_argument("--variants", nargs="*", default=["plain", "twin"], choices=list(rm.VARIANTS))
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--cfg", type=float, default=3.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cal-batch", type=int, default=8)
    ap.add_argument("--top", type=int, default=10)
    ap.add_argument("--out", default=os.path.join(quality.ROOT, "docs", "QUALITY_attribution.md"))
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OCTET_TEST_THREADS", "1")))
    t_start = time.time()
    sections, summary = [], []
    for kind in args.models:
        for variant in args.variants:
            fp = rm.load_reference(kind, variant)
            ctx = quality.Context(kind, variant, fp, args)
            cal = ctx.calibration(4)
            dm = bridge.diffusion_model(fp)
            pos = rm.batch_conditioning(kind, [4, 8])
            neg = rm.class_conditioning(kind, "unconditional", batch=2)
            t0 = time.time()
            result = quality.with_states(fp, pos, neg, rm.empty_latent(kind, 2), 4321, args.steps, args.cfg, "normal",
                                 lambda ev, sig: attribute(dm, ev, sig, RECIPE_STATIC, cal))
            t_attr = time.time() - t0
            policy, chosen = auto_policy(result, MARGIN_DB)
            n_dyn = sum(c == "dynamic" for c in chosen.values())
            top = [a.name for a in result.layers[:args.top]]
            ranges = class_ranges(fp, kind, args, top)
            sargs = quality.sampler_args(kind, args.samples, args)
            ref_img, _ = evaluate.to_images(fp, evaluate.sample_run(fp, *sargs).latents)
            rows = {
                "dynamic W8A8 per-token": bridge.quantize_model(fp, DynamicW8A8Config())[0],
                "static W8A8 + SmoothQuant a=0.5 (mse, 4 groups) = before": bridge.quantize_model(
                    fp, RECIPE_STATIC, calibration=cal)[0],
                f"auto: static where within {MARGIN_DB:g} dB of dynamic, else dynamic = after": bridge.quantize_model(
                    fp, RECIPE_STATIC, policy=policy, calibration=cal)[0],
                "auto + preset (float embeddings / adaLN / first, last layers)": bridge.quantize_model(
                    fp, RECIPE_STATIC, policy=auto_policy(result, MARGIN_DB,
                                                          base=preset(detect_preset(fp)))[0],
                    calibration=cal)[0],
            }
            scores = {k: score(fp, q, sargs, ref_img) for k, q in rows.items()}
            for k, v in scores.items():
                summary.append(f"| {kind} | {variant} | {k} | {v:.2f} |")
                print(f"{kind} {variant} {k}: {v:.2f} dB", flush=True)
            lines = [f"## {kind} / {variant}", "",
                     f"{len(result.layers)} layers measured in {t_attr:.0f} s on {sum(result.states_per_group)} states "
                     f"({result.states_per_group} per timestep group; group 0 is the least noisy; sigma boundaries "
                     f"{[round(b, 3) for b in result.boundaries]}). auto made {n_dyn} of {len(chosen)} layers "
                     f"dynamic. Worst {args.top} layers when made static (PSNR of the denoiser output with that layer "
                     "alone quantized; per group, and over all states; rows/call = activation rows per forward "
                     "call, tokens x batch):", "",
                     result.table(args.top, chosen), "",
                     "Input range per class (absmax of the layer's input, FP, cfg 1, one image per class 0-9) for "
                     "the same layers: max / min over classes, and the classes' values:", ""]
            for n in top:
                r = ranges[n]
                lines.append(f"- `{n}`: x{float(r.max() / r.min().clamp_min(1e-12)):.2f} — " +
                             " ".join(f"{v:.3g}" for v in r.tolist()))
            dyn_layers = [n for n, c in chosen.items() if c == "dynamic"]
            lines += ["", "Layers auto makes dynamic: " + (", ".join(f"`{n}`" for n in dyn_layers) or "none"), ""]
            sections.append("\n".join(lines))
    head = ["# Static W8A8 error attribution on the reference models", "",
            f"Generated by `bench/attribution.py` ({datetime.date.today().isoformat()}, CPU, torch {torch.__version__}, "
            f"{time.time() - t_start:.0f} s). Scored rows: image PSNR vs FP (mean over {args.samples} images, classes "
            f"0-9 cycled, seed {args.seed}, euler {args.steps} steps, cfg {args.cfg}, normal scheduler). Per-layer "
            "numbers: PSNR of the denoiser output with only that layer quantized, on the states of one float "
            "trajectory (seed 4321, classes 4 and 8): a model-output proxy, not image PSNR. Calibration: 8 images, "
            "seed 999 (bench/quality.py's). 'before' = the recipe's static layers everywhere; 'after' = "
            "octet.attribution.auto_policy's per-layer static/dynamic choice.", "",
            "| model | variant | method | image PSNR dB |", "|---|---|---|---:|", *summary, ""]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(head + sections) + "\n")
    print(f"wrote {args.out} in {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()
