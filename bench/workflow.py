"""A user's prompt, timed whole: the stock KSampler (``nodes.common_ksampler``) over N steps, per variant.

    python bench/workflow.py --models sdxl sd3.5-medium --steps 20 --rounds 5
    python bench/workflow.py --tiny                      # CPU smoke test of the same code

What a ComfyUI user waits for: every step of one prompt through the host's own sampler (conditioning,
cond/uncond batching, CFG, the sampler's arithmetic, model loading checks), not one ``apply_model`` call.
Variants (each its own full-size model, random weights, built in this one process):

- ``bf16``: the float model as Load Diffusion Model gives it.
- ``octet``: Quantize Model with its defaults (dynamic W8A8, goal speed, ``cuda_graph`` auto: each step replays
  a CUDA graph captured at the prompt's first step; nodes/graph_step.py).
- ``octet_eager``: the same with ``cuda_graph`` off: every step eager.
- ``bf16_graph``: the float model through the CUDA Graph Step node (what graphs alone give bf16).

``--dynamic-vram`` (ComfyUI >= 0.29): what ``main.py`` does on NVIDIA by default: comfy-aimdo initialised,
every MODEL a ``ModelPatcherDynamic`` whose weights start on the CPU (as a loader leaves them) and are staged
to the GPU by the host (an Octet model's layers load whole and stay loaded between prompts: nodes/dynamic_vram.py).
These rows add the host's ``load_models_gpu`` time per prompt and the modules aimdo stages.

After the rounds each variant samples the first prompt's seed again and compares it with its own first latent
(run-to-run determinism; the first prompt of a graph variant ran its warm-up and capture, later ones replay).
Per variant: the first prompt (in this process: the first Octet variant also pays Triton's autotuning, the
graph variants their capture), then ``--rounds`` rounds of one prompt per variant back to back, the order
rotating; a variant's speed-up is the median over rounds of bf16's prompt / its prompt in the same round (the
lent GPU hosts' CPU speed drifts between processes and minutes: bench/eager_paired.py). Prints the card
with every line and writes JSON under ``--out``.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import e2e  # noqa: E402
from e2e import octet_pack  # noqa: E402
from eager_paired import paired  # noqa: E402

VARIANTS = ("bf16", "octet", "octet_eager", "bf16_graph")
# What a user would set: CFG with a negative prompt (one batched cond+uncond call per step) except for
# guidance-distilled Flux-dev (cfg 1: one call of batch 1).
CFG = {"flux-dev": 1.0, "sdxl": 7.0, "sd1.5": 7.0, "sd3.5-medium": 5.0, "wan2.1-1.3b": 5.0}
POOLED = {"sdxl": 1280}   # SDXL's pooled text embedding; the others' is their "y" width (e2e shapes)


def conditioning(name: str, tiny: bool, seed: int):
    """A ComfyUI CONDITIONING like a text encoder's: [[tokens, {"pooled_output": ...}]] (random values)."""
    import torch
    _, conds = e2e.TINY_SHAPES[name] if tiny else e2e.MODELS[name][2:]
    if tiny and name == "sdxl":
        raise SystemExit("sdxl has no --tiny conditioning (its adm needs the full pooled width)")
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(conds["c_crossattn"], generator=g)
    extra = {}
    if "y" in conds:
        width = POOLED.get(name, conds["y"][-1])
        extra["pooled_output"] = torch.randn(1, width, generator=g)
    if "guidance" in conds:
        extra["guidance"] = 3.5
    return [[tokens, extra]]


def build(name: str, variant: str, device, tiny: bool, dynamic: bool = False):
    """The MODEL (ModelPatcher) of ``variant``, made the way a workflow makes it (``dynamic``: the host's
    dynamic-VRAM patcher, weights on the CPU until it loads them, as a loader leaves them)."""
    import comfy.model_patcher
    from comfyui_octet.nodes import graph_step
    from comfyui_octet.nodes.quantize_nodes import QuantizeModel

    model = e2e.build(name, "bf16", device, tiny)
    if dynamic:
        import comfy.model_management as mm
        offload = mm.unet_offload_device()
        model.to(offload)
        patcher_class = getattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcher)
        patcher = patcher_class(model, load_device=device, offload_device=offload)
    else:
        patcher = comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)
    if variant == "bf16":
        return patcher, "bf16"
    if variant == "bf16_graph":
        clone, _ = graph_step.install(patcher)
        return clone, "CUDA Graph Step node"
    t0 = time.perf_counter()
    out = QuantizeModel.execute(model=patcher, mode="dynamic", quantize_linear=True, quantize_conv=True,
                                backend="auto", cuda_graph="off" if variant == "octet_eager" else "auto").result
    e2e.sync()
    return out[0], f"{out[1].splitlines()[-1]} (quantized in {time.perf_counter() - t0:.1f} s)"


def prompt(patcher, name, latent, positive, negative, steps, seed, outputs: list | None = None) -> float:
    """Seconds for one KSampler run, the latent back on the host as the node returns it (into ``outputs``)."""
    import nodes
    e2e.sync()
    t0 = time.perf_counter()
    out = nodes.common_ksampler(patcher, seed, steps, CFG[name], "euler", "normal", positive, negative,
                                {"samples": latent})[0]["samples"]
    e2e.sync()
    seconds = time.perf_counter() - t0
    assert out.shape == latent.shape
    if outputs is not None:
        outputs.append(out.float())
    return seconds


def load_seconds(patcher, repeats: int = 3) -> float:
    """Median seconds of the host's ``load_models_gpu`` for an already loaded MODEL, which every prompt's sampler
    calls first: ~0 for the legacy patcher, a reload of every whole-loaded weight for 0.29's dynamic one."""
    import statistics

    import comfy.model_management as mm
    times = []
    for _ in range(repeats):
        e2e.sync()
        t0 = time.perf_counter()
        mm.load_models_gpu([patcher])
        e2e.sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def compare(a, b) -> dict:
    """max |a - b| and PSNR of ``a`` against ``b`` (peak: b's range)."""
    import math
    diff = (a - b).abs()
    mse = float((diff ** 2).mean())
    peak = float(b.max() - b.min())
    return {"max_abs": float(diff.max()), "psnr_db": math.inf if mse == 0 else 10 * math.log10(peak ** 2 / mse)}


def run_model(name, args, device, card, tiny) -> list[dict]:
    import torch
    from comfyui_octet.nodes import graph_step

    latent = torch.zeros(e2e.TINY_SHAPES[name][0] if tiny else e2e.MODELS[name][2])
    positive = conditioning(name, tiny, 1)   # on the CPU, where ComfyUI's text encoders leave it
    negative = conditioning(name, tiny, 2)
    models, rows, latents = {}, {}, {}
    for variant in args.variants:
        patcher, how = build(name, variant, device, tiny, args.dynamic_vram)
        if args.dynamic_vram:
            from comfyui_octet.nodes import host_compat
            # The host's class (Octet mixes its own into an INT8 MODEL's: nodes/host_compat.py, dynamic_vram.py)
            host_class = next(c for c in type(patcher).__mro__ if c.__module__.startswith("comfy."))
            how += f"; patcher {host_class.__name__}, dynamic {host_compat.dynamic_vram(patcher)}"
        out = []
        first = prompt(patcher, name, latent, positive, negative, args.steps, 0, out)
        models[variant], latents[variant] = patcher, out[0]
        rows[variant] = {"model": name, "variant": variant, "how": how, "first_prompt_s": first}
        if args.dynamic_vram:
            # What the host stages through aimdo (read per call by comfy.ops) rather than loading whole.
            staged = {n: type(m).__name__ for n, m in patcher.model.diffusion_model.named_modules() if hasattr(m, "_v")}
            rows[variant]["staged_modules"] = staged
            print(f"[{card}] {name} {variant}: {len(staged)} modules staged by aimdo: {list(staged)[:12]}", flush=True)
        print(f"[{card}] {name} {variant}: first prompt {first:.2f} s ({how})", flush=True)
    # Same seed, same weights (e2e.build seeds them): graphs must not change the image.
    for variant, twin in (("octet", "octet_eager"), ("bf16_graph", "bf16"), ("octet", "bf16")):
        if variant in latents and twin in latents:
            c = compare(latents[variant], latents[twin])
            rows[variant][f"vs_{twin}"] = c
            print(f"[{card}] {name} {variant} vs {twin}, first prompt's latent: max |diff| {c['max_abs']:.3g}, "
                  f"PSNR {c['psnr_db']:.1f} dB", flush=True)
    times = {v: [] for v in args.variants}
    for r in range(args.rounds):
        k = r % len(args.variants)
        for variant in args.variants[k:] + args.variants[:k]:
            times[variant].append(prompt(models[variant], name, latent, positive, negative, args.steps, 100 + r))
    # The first prompt's seed again, after the rounds: does a variant repeat its own latent (run-to-run
    # determinism), apart from how it differs from its twin above?
    for variant in args.variants:
        again = []
        prompt(models[variant], name, latent, positive, negative, args.steps, 0, again)
        rows[variant]["vs_own_first_prompt"] = c = compare(again[0], latents[variant])
        print(f"[{card}] {name} {variant}: the first prompt's seed again: max |diff| {c['max_abs']:.3g}", flush=True)
    for variant in args.variants:
        rows[variant]["load_models_gpu_s"] = seconds = load_seconds(models[variant])
        print(f"[{card}] {name} {variant}: the sampler's load_models_gpu on the loaded model {seconds * 1000:.1f} ms",
              flush=True)
    for variant, stats in paired(times, "bf16").items():
        step = graph_step.graph_step_of(models[variant])
        row = rows[variant]
        row.update(steps=args.steps, cfg=CFG[name], prompt_s=stats["step_ms"] / 1000,
                   ms_per_step=stats["step_ms"] / args.steps, speedup_vs_bf16=stats["speedup_vs_bf16"],
                   speedup_q1=stats["speedup_q1"], speedup_q3=stats["speedup_q3"], rounds=stats["rounds"],
                   prompt_s_rounds=times[variant])
        if step is not None:
            row.update(graph_stats=dict(step.stats), graph_bytes=step.cache.bytes, graph_report=step.report())
        print(f"[{card}] {name} {variant}: prompt {row['prompt_s']:.3f} s ({row['ms_per_step']:.1f} ms/step, "
              f"{args.steps} steps, cfg {row['cfg']}); vs bf16 in the same round {row['speedup_vs_bf16']:.2f}x "
              f"(quartiles {row['speedup_q1']:.2f}-{row['speedup_q3']:.2f}, {row['rounds']} rounds)", flush=True)
        if step is not None:
            print(step.report(), flush=True)
    return list(rows.values())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["sdxl", "sd3.5-medium", "flux-dev"], choices=list(e2e.MODELS))
    parser.add_argument("--variants", nargs="+", default=["bf16", "octet", "octet_eager"], choices=VARIANTS)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tiny", action="store_true", help="shrunken configs on CPU (smoke test)")
    parser.add_argument("--out", default=os.path.join(e2e.ROOT, "out", "workflow"))
    parser.add_argument("--dynamic-vram", action="store_true",
                        help="ComfyUI >= 0.29's dynamic VRAM, as its main.py enables it on NVIDIA by default")
    args = parser.parse_args()
    if "bf16" not in args.variants:
        parser.error("--variants must include bf16 (every speed-up is against it)")

    if args.dynamic_vram:   # as main.py: comfy-aimdo's library is loaded before torch
        try:
            import comfy_aimdo.control
            comfy_aimdo.control.init()
        except ImportError:     # a host without it (0.3.75): enable_dynamic_vram says so below
            pass
    import torch
    octet_pack.load(comfy=True, cpu=args.tiny or not torch.cuda.is_available())
    import comfy.model_management as mm
    import comfy.utils
    comfy.utils.PROGRESS_BAR_ENABLED = False
    device = mm.get_torch_device()
    tiny = args.tiny or device.type == "cpu"
    card = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    versions = {"torch": torch.__version__, "comfyui": e2e.comfy_version(), "python": sys.version.split()[0]}
    if device.type == "cuda":
        import triton
        versions["triton"] = triton.__version__
    if args.dynamic_vram:
        from comfyui_octet.nodes import host_compat
        versions["dynamic_vram"] = host_compat.enable_dynamic_vram()
    print(f"[{card}] {stamp}; {versions}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"workflow_{'_'.join(args.models)}{'_dynamic_vram' if args.dynamic_vram else ''}.json")
    rows = []
    for name in args.models:
        rows += run_model(name, args, device, card, tiny)
        mm.unload_all_models()      # this model's variants go before the next model's are built
        gc.collect()
        mm.soft_empty_cache()
        with open(path, "w") as f:
            json.dump({"header": f"card: {card}; {stamp}", "versions": versions, "rows": rows}, f, indent=1)
    print(f"[{card}] wrote {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
