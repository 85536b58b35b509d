"""A prompt on a card with less free VRAM than the model, as ComfyUI 0.29 starts on NVIDIA (dynamic VRAM).

INT8's first users are those whose card is too small for the bf16 model. Under 0.29's dynamic VRAM the host
streams a float model's weights through comfy-aimdo; Octet's layers load whole (nodes/dynamic_vram.py). This
bench takes most of the GPU's memory away (a tensor that leaves ``--free-gib`` free, as a smaller card would), then
runs two stock-KSampler prompts per variant (bf16, Quantize Model's defaults, and with goal memory) and records
whether they ran, how long each took (the first pays Triton's tuning and the capture), the peak memory and, if
one failed, the error a user would see and where it came from. Each case runs in its own process, as a user's
ComfyUI would (an out-of-memory error can leave torch's allocator unusable for the rest of a process). Writes JSON
under ``--out``.

Not quite a small card: "free" is what CUDA reports after the filler (torch's cache emptied first), and
comfy-aimdo may hand back memory it holds; torch's peak beside the filler is recorded to show what was used
(aimdo's staging of the bf16 model's weights is not in it).

    python bench/low_vram.py --dynamic-vram --model sdxl --free-gib 4
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import e2e  # noqa: E402
import workflow  # noqa: E402
from e2e import octet_pack  # noqa: E402


def build(name, variant, device, dynamic):
    """workflow.build's MODEL; ``octet_memory``: Quantize Model's defaults with goal memory (int8 weights only);
    ``octet_no_ahead``: the defaults with each streamed layer's copy made in its own call, on the compute stream
    (as before octet/stream_ahead.py), ``octet_ahead2`` with two copies made ahead (the default: one), to
    measure what copying ahead gains."""
    if variant in ("octet_no_ahead", "octet_ahead2"):
        from comfyui_octet.octet import stream_ahead
        if variant == "octet_no_ahead":
            stream_ahead._streams_usable = lambda device: False
        else:
            stream_ahead.AHEAD = 2
        variant = "octet"
    if variant != "octet_memory":
        return workflow.build(name, variant, device, False, dynamic)
    from comfyui_octet.nodes.quantize_nodes import QuantizeModel
    patcher, _ = workflow.build(name, "bf16", device, False, dynamic)
    out = QuantizeModel.execute(model=patcher, mode="dynamic", quantize_linear=True, quantize_conv=True,
                                backend="auto", goal="memory").result
    return out[0], out[1].splitlines()[-1]


def live_by_site(snapshot: dict, filler_bytes: int, top: int = 20) -> list:
    """The live allocations of a memory snapshot, summed by the innermost Python frame outside torch that allocated
    them (the filler left out): [(GiB, blocks, site, its callers innermost first)], largest first."""
    sites = {}
    for segment in snapshot.get("segments", []):
        for block in segment.get("blocks", []):
            if block.get("state") != "active_allocated" or block.get("size", 0) >= filler_bytes > 0:
                continue
            frames = [f"{'/'.join(f['filename'].split('/')[-2:])}:{f['line']} {f['name']}"
                      for f in block.get("frames", [])
                      if f["filename"].endswith(".py") and "/torch/" not in f["filename"]]
            site = frames[0] if frames else "?"        # the innermost Python frame outside torch
            entry = sites.setdefault(site, [0, 0, frames[1:6]])
            entry[0] += block["size"]
            entry[1] += 1
    ranked = sorted(sites.items(), key=lambda item: -item[1][0])[:top]
    return [(round(size / 2**30, 3), count, site, outer) for site, (size, count, outer) in ranked]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sdxl", choices=list(e2e.MODELS))
    parser.add_argument("--variants", nargs="+", default=["bf16", "octet", "octet_memory"],
                        choices=["bf16", "octet", "octet_eager", "octet_memory", "octet_no_ahead", "octet_ahead2"])
    parser.add_argument("--free-gib", type=float, nargs="+", default=[4.0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--dynamic-vram", action="store_true")
    parser.add_argument("--timed-prompts", type=int, default=1,
                        help="prompts timed after the first (ms/step is their median; each one's is in the row)")
    parser.add_argument("--out", default=os.path.join(e2e.ROOT, "out", "low_vram"))
    parser.add_argument("--memory-history", action="store_true",
                        help="record torch's allocation stacks; on an out-of-memory error, list the live memory by "
                             "where it was allocated (slower prompts)")
    parser.add_argument("--case", nargs=2, metavar=("FREE_GIB", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        return run_case(args, float(args.case[0]), args.case[1])
    # One process per case, as a user's ComfyUI starts: an out-of-memory error (above all one inside a CUDA graph
    # capture) can leave torch's allocator unusable for the rest of its process, which would fail the next cases.
    rows, header, versions = [], None, None
    for free_gib in args.free_gib:
        for variant in args.variants:
            command = [sys.executable, os.path.abspath(__file__), "--case", str(free_gib), variant,
                       "--model", args.model, "--steps", str(args.steps), "--timed-prompts", str(args.timed_prompts)] \
                + (["--dynamic-vram"] * args.dynamic_vram) \
                + (["--memory-history"] * args.memory_history)
            done = subprocess.run(command, capture_output=True, text=True)
            row = None
            for line in done.stdout.splitlines():
                if line.startswith(ROW):
                    row = json.loads(line[len(ROW):])
                elif not line.startswith("aimdo:"):
                    print(line, flush=True)
            for line in done.stderr.splitlines():
                if line.startswith("WARNING:octet") or line.startswith("INFO:octet"):
                    print("   ", line, flush=True)
            if row is None:         # the process died: what it said last
                tail = [line for line in done.stderr.splitlines() if line.strip()][-3:]
                row = {"model": args.model, "variant": variant, "free_gib_asked": free_gib, "ok": False,
                       "error": f"process ended with {done.returncode}: " + " | ".join(tail)[:500]}
                print(f"{args.model} {variant}, {free_gib} GiB: {row['error']}", flush=True)
            header, versions = row.pop("header", header), row.pop("versions", versions)
            rows.append(row)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"low_vram_{args.model}{'_dynamic_vram' if args.dynamic_vram else ''}.json")
    with open(path, "w") as f:
        json.dump({"header": header, "versions": versions, "rows": rows}, f, indent=1)
    print(f"wrote {path}")
    return 0


ROW = "LOW_VRAM_ROW "


def run_case(args, free_gib: float, variant: str) -> int:
    """One prompt pair in this process: prints the row as one JSON line."""
    if args.dynamic_vram:
        import comfy_aimdo.control      # as main.py: its library before torch
        comfy_aimdo.control.init()
    import torch
    if not torch.cuda.is_available():
        raise SystemExit("needs a GPU")
    octet_pack.load(comfy=True, cpu=False)
    import comfy.model_management as mm
    import comfy.utils
    from comfyui_octet.nodes import host_compat
    comfy.utils.PROGRESS_BAR_ENABLED = False
    device = mm.get_torch_device()
    card = torch.cuda.get_device_name()
    versions = {"torch": torch.__version__, "comfyui": e2e.comfy_version(), "python": sys.version.split()[0]}
    if args.dynamic_vram:
        versions["dynamic_vram"] = host_compat.enable_dynamic_vram()
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    name = args.model
    latent = torch.zeros(e2e.MODELS[name][2])
    positive, negative = workflow.conditioning(name, False, 1), workflow.conditioning(name, False, 2)
    patcher, how = build(name, variant, device, args.dynamic_vram)
    # The build made the weights on the GPU before moving them to the CPU: torch keeps those blocks cached (not in
    # mem_get_info's free) and would hand them to the prompt. Give them back first.
    torch.cuda.empty_cache()
    free = torch.cuda.mem_get_info()[0]
    filler = None
    take = free - int(free_gib * 2**30)
    if take > 0:
        filler = torch.empty(take, dtype=torch.uint8, device=device)
    free_now = torch.cuda.mem_get_info()[0]
    torch.cuda.reset_peak_memory_stats()
    filler_bytes = filler.numel() if filler is not None else 0
    row = {"header": f"card: {card}; {stamp}", "versions": versions, "model": name, "variant": variant, "how": how,
           "free_gib_asked": free_gib, "free_gib_before_prompt": free_now / 2**30, "filler_gib": filler_bytes / 2**30,
           "steps": args.steps}
    if args.memory_history:
        torch.cuda.memory._record_memory_history(max_entries=200000)
    try:
        first = workflow.prompt(patcher, name, latent, positive, negative, args.steps, 0)
        # The first prompt's peak since the graph step's warm-up, which resets it (octet/cuda_graph.py) if it runs.
        row["first_prompt_peak_gib"] = (torch.cuda.max_memory_allocated() - filler_bytes) / 2**30
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_stats(device)
        timed = [workflow.prompt(patcher, name, latent, positive, negative, args.steps, 1 + i)
                 for i in range(max(1, args.timed_prompts))]
        seconds = statistics.median(timed)
        row.update(ok=True, first_prompt_s=first, prompt_s=seconds, ms_per_step=seconds / args.steps * 1e3,
                   prompts_s=timed)
        # What the caching allocator did in the timed prompts: retries (an allocation that failed, freed the cache
        # and synchronized) and cudaMalloc / cudaFree calls tell memory pressure from a slower kernel path.
        after = torch.cuda.memory_stats(device)
        row["allocator"] = {key: after.get(key, 0) - before.get(key, 0)
                            for key in ("num_alloc_retries", "num_sync_all_streams", "num_device_alloc",
                                        "num_device_free", "num_ooms")}
    except Exception as exc:    # what the user would see in ComfyUI's error dialog, and where it came from
        frames = [f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in traceback.extract_tb(exc.__traceback__)]
        row.update(ok=False, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}", where=frames[-6:])
        if args.memory_history and isinstance(exc, torch.OutOfMemoryError):
            row["live_at_error"] = live_by_site(torch.cuda.memory._snapshot(), filler_bytes)
    # The timed prompt's, torch's allocator only: comfy-aimdo's staging buffers (the bf16 model's streamed weights)
    # are not in it
    row["peak_allocated_gib"] = (torch.cuda.max_memory_allocated() - filler_bytes) / 2**30
    if args.dynamic_vram:
        row["staged_modules"] = sum(hasattr(m, "_v") for m in patcher.model.diffusion_model.modules())
    from comfyui_octet.nodes import graph_step
    from comfyui_octet.octet import stream_ahead
    # Both prompts': streamed calls that found their weight copied ahead / copies made ahead and dropped.
    row["copies_made_ahead"] = dict(stream_ahead.stats)
    step = graph_step.graph_step_of(patcher)
    if step is not None:        # whether the steps replayed, and why not where they ran eager
        row["graph_step"] = step.report()
    print(f"[{card}] {stamp} {name} {variant}, {free_now / 2**30:.1f} GiB free: "
          + (f"ran, first prompt {row['first_prompt_s']:.2f} s, second {row['prompt_s']:.2f} s "
             f"({row['ms_per_step']:.0f} ms/step; allocator in the timed prompts: {row['allocator']})"
             if row["ok"] else row["error"] + f" at {row['where']}")
          + f"; peak allocated by torch beside the filler {row['peak_allocated_gib']:.2f} GiB; "
            f"staged modules {row.get('staged_modules')}; streamed calls with their copy made ahead "
            f"{row['copies_made_ahead']['ahead']} (dropped {row['copies_made_ahead']['missed']})"
          + (f"\n    {row['graph_step']}" if "graph_step" in row else "")
          + "".join(f"\n    live at the error: {gib:.3f} GiB in {n} block(s) from {site} <- {outer}"
                    for gib, n, site, outer in row.get("live_at_error", [])), flush=True)
    print(ROW + json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
