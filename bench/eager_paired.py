"""Eager steps of several variants, interleaved in one process: ``python bench/eager_paired.py --model sdxl
--variants bf16 octet_dynamic --rounds 40``.

Why paired: the GPU hosts we are lent are KVM guests whose CPU speed drifts. In the thirteenth session (H200, one
call) the same bf16 SDXL step measured 50.1 to 85.2 ms in nine fresh processes, pinned to one core or not, with
host CPU time equal to the step time in every one (docs/BENCHMARKS.md). An eager step is host-bound, so a
comparison of two processes (or of two variants timed one after the other in one process) measures that drift as
much as the variants. Here every variant's model is built first; then each round times one step of each variant
back to back (the order rotating), so a slow second slows every variant of that round alike, and the speed-up is
the median over rounds of bf16's step / the variant's step in the same round.

Prints per variant the median step, the host's CPU time per step, and the paired speed-up with its quartiles;
writes them as JSON under out/eager_paired/. On CPU it runs the tiny configs (a smoke test)."""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import e2e  # noqa: E402
from e2e import octet_pack  # noqa: E402

# Variants whose Octet switches (e2e.SWITCH_OFF, environment variables some layers read per call) are all on: two
# models in one process cannot have them set differently.
# The lean stacks' switch is read when a model is quantized (octet/lean_blocks.py), so its variants pair too;
# bf16_octet_qk needs OCTET_DEFERRED on, as every other variant here.
# octet_dynamic_eager_deferral: its plans take deferred inputs in eager steps too (OCTET_EAGER_DEFERRAL=1 while they
# are made, in its warm-up: kernels/backends/triton_backend.py deferral_pays), for a GPU-bound host.
# octet_dynamic_layers: the MLPs' fc1 without the GELU in its epilogue (OCTET_FUSED_MLP=0, read per call: set
# around each of that variant's steps, and to 1 around every other's; PER_CALL); octet_dynamic_host_float: the
# host's GroupNorms, GEGLUs and Wan's norm1 + modulation passes (OCTET_FLOAT_FUSIONS=0, likewise);
# octet_dynamic_all_int8: every W8A8 linear on the INT8 kernels whatever the cost model says (bench/e2e.py).
PAIRABLE = ("bf16", "host_fp8_e4m3fn_fast", "octet_weight_only", "octet_dynamic", "octet_static",
            "octet_dynamic_memory", "octet_dynamic_not_lean", "bf16_octet_lean", "bf16_octet_qk",
            "octet_dynamic_eager_deferral", "octet_dynamic_sdpa", "octet_dynamic_flash", "octet_dynamic_cudnn",
            "octet_dynamic_layers", "octet_dynamic_host_float", "bf16_octet_fused", "octet_dynamic_all_int8",
            "bf16_int8attn", "octet_dynamic_int8attn", "octet_static_int8attn")
PER_CALL = {suffix: e2e.SWITCH_OFF[suffix] for suffix in ("_layers", "_host_float")}   # e2e's, those read per call


def per_call_switches(variant: str) -> dict[str, str]:
    """The switches read per call, as ``variant`` runs with them: off where its suffix names them, else on."""
    return {switch: "0" if variant.endswith(suffix) else "1"
            for suffix, switches in PER_CALL.items() for switch in switches}


def build_variant(name: str, variant: str, dev, tiny: bool, x, sigma, kw):
    """``name``'s model (e2e.build) as ``variant`` runs it: quantized by Octet, or bf16 with some of Octet's float
    parts installed, or the host's fp8."""
    variant = variant.removesuffix(e2e.INT8_ATTENTION)     # its override goes in the step's kwargs (main)
    model = e2e.build(name, "host_fp8_e4m3fn_fast" if variant == "host_fp8_e4m3fn_fast" else "bf16", dev, tiny)
    if variant.startswith("octet_"):
        e2e.quantize(model, variant.removesuffix("_eager_deferral"), x, sigma, kw)
    elif variant == "bf16_octet_lean":
        e2e.lean_install(model.diffusion_model)
    elif variant == "bf16_octet_qk":          # the q/k preparation kernels alone (Flux, SD3, Wan), no INT8
        from comfyui_octet.octet import deferred
        deferred.install_qk(model.diffusion_model)
    elif variant == "bf16_octet_fused":       # every float fusion (q/k preparation, GroupNorm, GEGLU, Wan's norm1 +
        from comfyui_octet.octet import deferred, float_fusions     # modulation), no INT8
        deferred.install_qk(model.diffusion_model)
        float_fusions.install(model.diffusion_model)
    return model


def quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return (values[0],) * 3 if values else (float("nan"),) * 3
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def paired(times: dict[str, list[float]], baseline: str) -> dict[str, dict]:
    """Per variant: median step (ms) and the median (with quartiles) over rounds of baseline step / variant step,
    each ratio from one round."""
    out = {}
    for name, steps in times.items():
        ratios = [b / s for b, s in zip(times[baseline], steps)]
        q1, q2, q3 = quartiles(ratios)
        out[name] = {"step_ms": statistics.median(steps) * 1000, "step_ms_min": min(steps) * 1000,
                     f"speedup_vs_{baseline}": q2, "speedup_q1": q1, "speedup_q3": q3, "rounds": len(steps)}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sdxl", choices=list(e2e.MODELS))
    parser.add_argument("--variants", nargs="+", default=["bf16", "octet_dynamic"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--deadline", type=float, default=None,
                        help="seconds from the start: no new round begins after it (a device call's time limit "
                             "then still leaves the rounds done and their JSON)")
    parser.add_argument("--out", default=os.path.join(e2e.ROOT, "out", "eager_paired"))
    args = parser.parse_args()
    wrong = [v for v in args.variants if v not in PAIRABLE]
    if wrong or "bf16" not in args.variants:
        parser.error(f"variants must include bf16 and come from {', '.join(PAIRABLE)} (got {', '.join(wrong)}): "
                     "the others switch Octet features off through the environment, for the whole process")

    started = time.monotonic()
    import torch
    octet_pack.load(comfy=True, cpu=not torch.cuda.is_available())
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tiny = dev.type == "cpu"
    card = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    x, sigma, kw = e2e.inputs(args.model, dev, tiny)
    models, rows, kws = {}, {}, {}
    for variant in args.variants:
        model = build_variant(args.model, variant, dev, tiny, x, sigma, kw)
        forced = variant.endswith("_eager_deferral")
        if forced:
            os.environ["OCTET_EAGER_DEFERRAL"] = "1"
        os.environ.update(per_call_switches(variant))
        kws[variant] = e2e.attention_kw(variant, kw)
        e2e.time_steps(model, x, sigma, kws[variant], args.warmup, 0)      # plans made, kernels tuned
        os.environ.pop("OCTET_EAGER_DEFERRAL", None)
        models[variant] = model
        rows[variant] = {"weight_bytes": e2e.weight_bytes(model.diffusion_model)}
    gc.collect()
    times = {v: [] for v in args.variants}
    cpu = {v: [] for v in args.variants}
    for r in range(args.rounds):
        if args.deadline is not None and r and time.monotonic() - started > args.deadline:
            print(f"eager_paired: deadline {args.deadline:.0f} s passed, {r} of {args.rounds} rounds run", flush=True)
            break
        k = r % len(args.variants)
        for variant in args.variants[k:] + args.variants[:k]:
            os.environ.update(per_call_switches(variant))
            times[variant] += e2e.time_steps(models[variant], x, sigma, kws[variant], 0, 1, cpu=cpu[variant])
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    versions = {"torch": torch.__version__, "comfyui": e2e.comfy_version()}
    for variant, stats in paired(times, "bf16").items():
        rows[variant].update(stats, model=args.model, variant=variant, mode="eager_paired", card=card,
                             versions=versions, host_cpu_ms=statistics.median(cpu[variant]) * 1000)
        r = rows[variant]
        print(f"[{card}] {args.model} {variant}: step {r['step_ms']:.1f} ms (min {r['step_ms_min']:.1f}, host CPU "
              f"{r['host_cpu_ms']:.1f}); vs bf16 in the same round {r['speedup_vs_bf16']:.2f}x "
              f"(quartiles {r['speedup_q1']:.2f}-{r['speedup_q3']:.2f}, {r['rounds']} rounds)", flush=True)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"eager_paired_{args.model}.json")
    with open(path, "w") as f:
        json.dump({"header": f"card: {card}; {stamp}", "rows": list(rows.values()),
                   "step_ms_per_round": {v: [t * 1000 for t in ts] for v, ts in times.items()}}, f, indent=1)
    print(f"[{card}] wrote {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
