"""Which inputs make 3-class calibration fail on the SD3 MMDiT? (issue 15)

    OCTET_TEST_THREADS=1 .venv/bin/python bench/generalisation_streams.py

Static W8A8 + SmoothQuant 0.5 (mse, 4 timestep groups), calibrated on bench/quality.py's SUBSET_CLASSES (3 of
10) or on all 10 (seed 999, 8 images), with layer groups switched to dynamic per-token by policy rules:
the text stream (context_block, context_embedder), the conditioning path (adaLN modulations, t/y embedders:
one row per sample whose range moves with timestep and class), both, and conditioning + first/last layers
float. Scored like bench/quality.py: image PSNR vs FP, 20 images, classes 0-9 cycled, seed 0, euler 8, cfg 3.
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
from comfyui_octet.octet.policy import Policy, Rule  # noqa: E402

TEXT = [Rule("*.context_block.*", "dynamic"), Rule("context_embedder", "dynamic")]
COND = [Rule("*adaLN_modulation*", "dynamic"), Rule("t_embedder", "dynamic"), Rule("y_embedder", "dynamic")]
ENDS = [Rule("x_embedder", "keep"), Rule("final_layer", "keep")]
POLICIES = {"all static": None, "text stream dynamic": TEXT, "conditioning path dynamic": COND,
            "text stream + conditioning dynamic": TEXT + COND, "conditioning dynamic + first/last float": COND + ENDS}


def main():
    torch.set_num_threads(int(os.environ.get("OCTET_TEST_THREADS", torch.get_num_threads())))
    args = argparse.Namespace(samples=20, steps=8, cfg=3.0, seed=0, cal_batch=8, qat_steps=120)
    config = StaticW8A8Config(observer="mse", timestep_groups=True, smooth_alpha=0.5)
    labels = torch.tensor([i % 10 for i in range(args.samples)])
    print("| variant | calibrated on | layers made dynamic | PSNR all | per class 0-9 |\n|---|---|---|---:|---|")
    for variant in rm.VARIANTS:
        fp = rm.load_reference("mmdit", variant)
        sargs = Q.sampler_args("mmdit", args.samples, args)
        ref, _ = evaluate.to_images(fp, evaluate.sample_run(fp, *sargs).latents)
        for classes in (Q.SUBSET_CLASSES, tuple(range(10))):
            cal = Q.Context("mmdit", variant, fp, args, cal_classes=classes).calibration(4)
            for name, rules in POLICIES.items():
                policy = Policy(name=name, rules=list(rules)) if rules else None
                q = bridge.quantize_model(fp, config, policy=policy, calibration=cal)[0]
                img, _ = evaluate.to_images(fp, evaluate.sample_run(q, *sargs).latents)
                p = evaluate.metrics.psnr(ref, img)
                per = " ".join(f"{float(p[labels == c].mean()):.1f}" for c in range(10))
                print(f"| {variant} | {len(classes)} classes | {name} | {float(p.mean()):.2f} | {per} |", flush=True)


if __name__ == "__main__":
    main()
