"""Is the 3-class calibration loss the observer clipping tails, or the range itself? (issue 15)

    OCTET_TEST_THREADS=1 .venv/bin/python bench/generalisation_observers.py [--model mmdit]

Static W8A8 on a reference model, calibrated on bench/quality.py's SUBSET_CLASSES (3 of 10) or on all 10
(calibration seed 999, 8 images), with observers minmax / mse / percentile 99.9, with and without SmoothQuant
0.5, 4 timestep groups or 1. Scored like bench/quality.py: image PSNR vs FP, 20 images, classes 0-9 cycled,
seed 0, euler 8 steps, cfg 3; prints the mean and the per-class means (markdown rows).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import quality as Q  # noqa: E402
import torch  # noqa: E402

from comfyui_octet.nodes import bridge, evaluate  # noqa: E402

from comfyui_octet.fixtures import reference_model as rm
from comfyui_octet.octet import StaticW8A8Config  # noqa: E402

SETTINGS = (("minmax", None, 4), ("minmax", 0.5, 4), ("mse", 0.5, 4), ("minmax", 0.5, 1), ("percentile", 0.5, 4))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mmdit", choices=list(rm.SPECS))
    cli = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OCTET_TEST_THREADS", torch.get_num_threads())))
    args = argparse.Namespace(samples=20, steps=8, cfg=3.0, seed=0, cal_batch=8, qat_steps=120)
    fp = rm.load_reference(cli.model)
    sargs = Q.sampler_args(cli.model, args.samples, args)
    ref, _ = evaluate.to_images(fp, evaluate.sample_run(fp, *sargs).latents)
    labels = torch.tensor([i % 10 for i in range(args.samples)])
    print("| calibrated on | observer | SmoothQuant | groups | PSNR all | per class 0-9 |\n|---|---|---|---:|---:|---|")
    for classes in (Q.SUBSET_CLASSES, tuple(range(10))):
        ctx = Q.Context(cli.model, "plain", fp, args, cal_classes=classes)
        for observer, alpha, groups in SETTINGS:
            config = StaticW8A8Config(observer=observer, timestep_groups=groups > 1, smooth_alpha=alpha,
                                      percentile=99.9)
            q = bridge.quantize_model(fp, config, calibration=ctx.calibration(groups))[0]
            img, _ = evaluate.to_images(fp, evaluate.sample_run(q, *sargs).latents)
            p = evaluate.metrics.psnr(ref, img)
            per = " ".join(f"{float(p[labels == c].mean()):.1f}" for c in range(10))
            print(f"| {len(classes)} classes | {observer}{' 99.9' if observer == 'percentile' else ''} | {alpha} | "
                  f"{groups} | {float(p.mean()):.2f} | {per} |", flush=True)


if __name__ == "__main__":
    main()
