"""Mixed-precision policies on the embedded reference model: size vs quality, and the Pareto front.

Run from the repository root:  /work/venv/bin/python bench/policy_quality.py [--quick]
Writes docs/QUALITY_policy.md and docs/policy_pareto.png (and prints the table).

Rows (all W8A8 dynamic, the mode where the choice of float layers matters most):
  * no policy            - every Linear/Conv2d in INT8;
  * preset / +conservative - the architecture preset (auto-detected: SD15), and its conservative variant;
  * sensitivity share X  - preset layers kept, then the Sensitivity Policy keeps the most sensitive
                           layers per parameter until X of the remaining parameters are in float.
Size: the diffusion model's weights with INT8 layers as stored (int8 + scales) and everything else
in bf16. Quality: PSNR of latents sampled by the host KSampler against the float model's latents
from the same seed, averaged over held-out seeds and a held-out conditioning (sensitivity is
measured with a different seed and conditioning).

Two models: the embedded tiny SD15 (random weights) and a twin with planted outliers: in a few
ResBlocks, one input channel of the output conv is silenced by its GroupNorm and that conv's
column is made huge. The float model is unchanged; INT8's per-channel scales are not. This is
the failure the policy exists for. Trained reference models come with issue 9.
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import octet_pack  # noqa: E402
SAMPLER = dict(steps=10, cfg=4.0, sampler_name="euler", scheduler="normal")
EVAL_SEEDS = (1000, 1001, 1002)
PLANTED = ("input_blocks.1.0", "middle_block.2", "output_blocks.2.0")


def load_pack():
    return octet_pack.load(comfy=True, cpu=True)


def plant_outliers(patcher):
    dm = patcher.model.diffusion_model
    with torch.no_grad():
        for i, block in enumerate(PLANTED):
            rb = dm.get_submodule(block)
            norm, conv = rb.out_layers[0], rb.out_layers[3]
            c = 5 + i
            norm.weight[c], norm.bias[c] = 0.0, -20.0  # SiLU(-20) ~ 0: the channel carries nothing in float
            conv.weight[:, c] = 300 * conv.weight.abs().max()
    return patcher


def sample(patcher, seed, size):
    import nodes
    from comfyui_octet.fixtures import reference_model
    latent = {"samples": torch.zeros(1, 4, size, size)}
    pos = reference_model.tiny_conditioning(seed=101)  # held out: sensitivity uses seed 1
    neg = reference_model.tiny_conditioning(seed=102)
    return nodes.common_ksampler(patcher, seed, SAMPLER["steps"], SAMPLER["cfg"], SAMPLER["sampler_name"],
                                 SAMPLER["scheduler"], pos, neg, latent)[0]["samples"]


def weights_mib(patcher, result) -> float:
    """INT8 layers as stored, everything else in bf16."""
    quantized = {r.name: r for r in result.quantized} if result is not None else {}
    total = 0
    for name, p in patcher.model.diffusion_model.named_parameters():
        layer = name.rsplit(".", 1)[0]
        if layer not in quantized:
            total += 2 * p.numel()
    total += sum(r.bytes_after for r in quantized.values())
    return total / 2**20


def rows_for(label, patcher, args):
    from comfyui_octet.nodes import bridge
    from comfyui_octet.fixtures import reference_model
    from comfyui_octet.nodes.policy_nodes import MixedPrecisionPolicy, SensitivityPolicy
    from comfyui_octet.octet import config_for_mode
    from comfyui_octet.octet.metrics import tensor_psnr

    config = config_for_mode("dynamic")
    refs = {s: sample(patcher, s, args.size) for s in EVAL_SEEDS}
    policies = [("no policy", None, 0.0)]
    for conservative in (False, True):
        t = time.time()
        pol = MixedPrecisionPolicy.execute("auto", conservative, "default", "", "", patcher).result[0]
        policies.append(("preset " + pol.name.split(":")[1], pol, time.time() - t))
    pos = reference_model.tiny_conditioning(seed=1)
    for share in args.shares:
        t = time.time()
        pol = SensitivityPolicy.execute(patcher, pos, {"samples": torch.zeros(1, 4, args.size, args.size)}, "dynamic",
                                        "max_float_share", share, "auto", 0, args.sens_steps, 1.0, "normal",
                                        0).result[0]
        policies.append((f"sensitivity share {share:g}", pol, time.time() - t))
    rows = [dict(model=label, policy="float (bf16)", mib=weights_mib(patcher, None), psnr=math.inf, float_share=1.0,
                 seconds=0.0)]
    for name, pol, seconds in policies:
        quantized, result = bridge.quantize_model(patcher, config, policy=pol)
        scores = [tensor_psnr(refs[s], sample(quantized, s, args.size)) for s in EVAL_SEEDS]
        kept = sum(r.params for r in result.skipped)
        rows.append(dict(model=label, policy=name, mib=weights_mib(patcher, result), psnr=sum(scores) / len(scores),
                         float_share=kept / sum(r.params for r in result.layers), seconds=seconds))
        del quantized
        bridge.quantized_layers(patcher)  # unload the clone before the next one (they share the torch model)
    return rows


def draw(all_rows, path):
    """Size vs PSNR per model with its Pareto front (nodes/plotting.py, the one chart code)."""
    from comfyui_octet.nodes.plotting import pareto_chart
    panels = {model: [{"x": r["mib"], "y": r["psnr"], "label": r["policy"]} for r in all_rows if r["model"] == model]
              for model in dict.fromkeys(r["model"] for r in all_rows)}
    pareto_chart(panels, path, "weights (MiB; INT8 as stored, rest bf16)", "PSNR of sampled latents vs float (dB)")


def table(rows):
    lines = ["| model | policy | weights MiB | float params | PSNR dB (mean of 3 seeds) | policy time s |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        p = "inf" if not math.isfinite(r["psnr"]) else f"{r['psnr']:.2f}"
        lines.append(f"| {r['model']} | {r['policy']} | {r['mib']:.3f} | {100 * r['float_share']:.1f}% | {p} | "
                     f"{r['seconds']:.1f} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=16, help="latent size (pixels / 8)")
    ap.add_argument("--sens-steps", type=int, default=4, help="sampling steps the sensitivity is measured over")
    ap.add_argument("--shares", type=float, nargs="+", default=[0.05, 0.2], help="max_float_share budgets")
    ap.add_argument("--quick", action="store_true", help="plain model only, one budget")
    args = ap.parse_args()
    load_pack()
    import comfy.utils
    comfy.utils.PROGRESS_BAR_ENABLED = False  # dozens of sampling runs: keep the output to the table
    from comfyui_octet.fixtures import reference_model
    if args.quick:
        args.shares = args.shares[:1]
    t0 = time.time()
    rows = rows_for("tiny SD15", reference_model.build_tiny_sd15(), args)
    if not args.quick:
        rows += rows_for("tiny SD15 + planted outliers", plant_outliers(reference_model.build_tiny_sd15()), args)
    docs = os.path.join(ROOT, "docs")
    os.makedirs(docs, exist_ok=True)
    png = os.path.join(docs, "policy_pareto.png")
    draw(rows, png)
    md = [
        "# Mixed-precision policy: size vs quality",
        "",
        f"Generated by `bench/policy_quality.py` on {datetime.date.today()} ({torch.get_num_threads()} CPU threads, "
        f"{time.time() - t0:.0f} s). W8A8 dynamic; host KSampler {SAMPLER['sampler_name']}/{SAMPLER['scheduler']}, "
        f"{SAMPLER['steps']} steps, cfg {SAMPLER['cfg']}, latent {args.size}x{args.size}; sensitivity over "
        f"{args.sens_steps} steps at seed 0 with another conditioning than the evaluation.",
        "",
        table(rows),
        "",
        "![Pareto front](policy_pareto.png)",
        "",
        "Reading it: *float params* is the share of Linear/Conv2d parameters left in float; a sensitivity budget "
        "counts only the parameters it measured (those the preset does not already keep), so share 0.05 lands at "
        "the preset's share plus 5% of the rest. The planted outliers leave the float model unchanged and are "
        "invisible to the name-based presets; only the measured policy finds them. The tiny models have "
        "random weights, so absolute PSNRs say little about a trained model; the comparison between rows on the "
        "same model is the point. Trained reference models (issue 9) will replace them.",
    ]
    with open(os.path.join(docs, "QUALITY_policy.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    print(table(rows))
    print(f"wrote docs/QUALITY_policy.md and {os.path.relpath(png, ROOT)}")


if __name__ == "__main__":
    main()
