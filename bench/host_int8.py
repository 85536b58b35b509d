"""One int8_tensorwise file, three ways: stock ComfyUI's own INT8 path vs Octet's kernels (issue 16).

Needs a host with ``int8_tensorwise`` (ComfyUI 0.29+, comfy-kitchen). Per model it writes a random
full-size diffusion-model file (bf16, the host's real key names), converts it with Octet's converter
to a *portable* file (per-row ``int8_tensorwise`` Linear layers, the rest bf16: the format of the
community's int8 files), then loads and times one ``apply_model`` step through:

  * ``float source``: the bf16 source file in stock Load Diffusion Model (``comfy.sd.load_diffusion_model``);
  * ``host int8_tensorwise``: the portable file in stock Load Diffusion Model (comfy-kitchen's INT8);
  * ``octet Load Quantized``: the same portable file in Octet's loader (Octet's plans and kernels);
  * and the last through the CUDA Graph Step node (``octet graph``).

All in one process, every ratio against the bf16 row of the same model, the same compute dtype for
all three (the one the host picks for the model, forced on the stock loads).

    COMFYUI_PATH=/path/to/comfy029 python bench/host_int8.py --models flux-dev sdxl --out out/host_int8
    COMFYUI_PATH=/path/to/comfy029 python bench/host_int8.py --tiny     # CPU smoke test (tiny Flux)
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import octet_pack  # noqa: E402


def shapes_of(name: str, tiny: bool) -> dict:
    """Key -> shape of the model's diffusion_models file, built on the meta device (no memory)."""
    import torch
    from e2e import model_config

    # Tiny: heads of 128 channels, as the host's Flux detection assumes (it derives num_heads from them).
    config = model_config(name, tiny, {"hidden_size": 256, "num_heads": 2, "axes_dim": [16, 56, 56]} if tiny else None)
    config.set_inference_dtype(torch.bfloat16, None)
    model = config.get_model({}, "", device=torch.device("meta"))
    return {k: tuple(v.shape) for k, v in model.diffusion_model.state_dict().items()}


def step_ms(patcher, name: str, device, tiny: bool, warmup: int, iters: int) -> float:
    import comfy.model_management as mm
    from e2e import inputs, time_steps

    mm.load_models_gpu([patcher], force_full_load=True)
    x, sigma, kw = inputs(name, device, tiny)
    return statistics.median(time_steps(patcher.model, x, sigma, kw, warmup, iters, inference=True)) * 1000


def graph_step_ms(patcher, name: str, device, tiny: bool, warmup: int, iters: int) -> tuple[float, str]:
    """The same model through CUDA Graph Step (bench/e2e.py's driver), the wrapped clone loaded as Load
    Diffusion Model's models are."""
    import comfy.model_management as mm
    from e2e import inputs, through_graph_step

    x, sigma, kw = inputs(name, device, tiny)
    g = through_graph_step(patcher, x, sigma, kw, warmup, iters,
                           load=lambda clone: mm.load_models_gpu([clone], force_full_load=True))
    return statistics.median(g["times"]) * 1000, g["report"]


def run_model(name: str, args, device, workdir: str) -> list[dict]:
    import torch
    import comfy.model_management as mm
    import comfy.sd
    write_random = _bench_module("convert").write_random   # bench/convert.py's streaming random-file writer
    from comfyui_octet.nodes import model_files
    from comfyui_octet.octet.config import config_for_mode
    from comfyui_octet.octet.convert import convert

    src = os.path.join(workdir, f"{name}_bf16.safetensors")
    portable = os.path.join(workdir, f"{name}_int8_tensorwise.safetensors")
    t0 = time.perf_counter()
    write_random(src, shapes_of(name, args.tiny), torch.bfloat16, device=device.type, note=f"random {name}")
    convert(src, portable, config_for_mode("dynamic"), kind="portable", overwrite=True)
    print(f"[{args.card}] {name}: wrote and converted in {time.perf_counter() - t0:.0f} s "
          f"({os.path.getsize(src) / 2**30:.2f} -> {os.path.getsize(portable) / 2**30:.2f} GiB)", flush=True)

    rows = []

    def measure(label: str, load, graph: bool = False):
        row = {"model": name, "path": label, "card": args.card, "versions": args.versions}
        try:
            mm.unload_all_models()
            mm.soft_empty_cache()
            before = torch.cuda.memory_allocated() if device.type == "cuda" else 0
            t = time.perf_counter()
            patcher = load()
            row["load_s"] = time.perf_counter() - t
            row["step_ms"] = step_ms(patcher, name, device, args.tiny, args.warmup, args.iters)
            if device.type == "cuda":
                row["weights_on_gpu_bytes"] = torch.cuda.memory_allocated() - before
            row["dtype"] = str(patcher.model.get_dtype()).replace("torch.", "")
            rows.append(row)
            print(f"[{args.card}] " + json.dumps(row), flush=True)
            if graph:
                g = dict(row, path=label + " + CUDA Graph Step")
                g["step_ms"], report = graph_step_ms(patcher, name, device, args.tiny, args.warmup, args.iters)
                rows.append(g)
                print(report, flush=True)
            del patcher
        except Exception as e:  # one failing path must not hide the others
            traceback.print_exc()
            rows.append(dict(row, error=f"{type(e).__name__}: {e}"))

    # Octet first: the dtype Octet's loader picks (the host's unet_dtype rule) is forced on the stock loads.
    measure("octet Load Quantized", lambda: model_files.load_model(portable), graph=device.type == "cuda")
    dtype = getattr(torch, rows[-1].get("dtype", "bfloat16")) if rows else torch.bfloat16
    opts = {"dtype": dtype}
    measure("host int8_tensorwise", lambda: comfy.sd.load_diffusion_model(portable, model_options=dict(opts)),
            graph=device.type == "cuda")
    measure("float source", lambda: comfy.sd.load_diffusion_model(src, model_options=dict(opts)), graph=device.type == "cuda")
    mm.unload_all_models()
    for path in (src, portable, portable[:-len(".safetensors")] + ".md"):
        if os.path.exists(path):
            os.remove(path)
    return rows


def _bench_module(name: str):
    """A sibling bench script as a module (scripts/ has a convert.py too, so no plain import)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(ROOT, "bench", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, "", "| model | path | dtype | step ms | vs float (same mode) | vs stock int8_tensorwise (same mode) | "
             "weights on GPU GiB | load s |", "|---|---|---|---|---|---|---|---|"]
    def base(r, path):
        mode = " + CUDA Graph Step" if r["path"].endswith("Graph Step") else ""
        return next((b for b in rows if b["model"] == r["model"] and b["path"] == path + mode and "step_ms" in b), None)
    for r in rows:
        if "step_ms" not in r:
            lines.append(f"| {r['model']} | {r['path']} | | failed: {r.get('error', '?')[:100]} | | | | |")
            continue
        b, h = base(r, "float source"), base(r, "host int8_tensorwise")
        vs_b = f"{b['step_ms'] / r['step_ms']:.2f}x" if b else "n/a"
        vs_h = f"{h['step_ms'] / r['step_ms']:.2f}x" if h else "n/a"
        gib = f"{r['weights_on_gpu_bytes'] / 2**30:.2f}" if "weights_on_gpu_bytes" in r else "n/a"
        lines.append(f"| {r['model']} | {r['path']} | {r.get('dtype', '?')} | {r['step_ms']:.1f} | {vs_b} | {vs_h} | {gib} | {r['load_s']:.1f} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["sdxl", "flux-dev"], choices=["flux-dev", "sdxl"])
    ap.add_argument("--deadline", type=float, default=None, help="seconds after which no new model is started")
    ap.add_argument("--tiny", action="store_true", help="shrunken Flux on CPU (smoke test)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=6)
    ap.add_argument("--dir", default=None, help="where the generated files go (default: a temp dir)")
    ap.add_argument("--out", default=os.path.join(ROOT, "out", "host_int8"))
    args = ap.parse_args()

    octet_pack.load(comfy=True, cpu=args.tiny)
    import platform

    import torch
    import triton
    import comfy.quant_ops
    from e2e import comfy_version

    if "int8_tensorwise" not in getattr(comfy.quant_ops, "QUANT_ALGOS", {}):
        print(f"ComfyUI {comfy_version()} has no int8_tensorwise: run this with ComfyUI 0.29+ (COMFYUI_PATH).")
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if args.tiny:
        args.models = ["flux-dev"]   # the host detects a shrunken Flux from its keys; not a shrunken SDXL
    args.card = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    args.versions = {"torch": torch.__version__, "triton": triton.__version__, "comfyui": comfy_version(),
                     "comfy_kitchen": _version("comfy-kitchen"), "python": platform.python_version()}
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header = (f"card: {args.card}; torch {torch.__version__}; triton {triton.__version__}; ComfyUI "
              f"{args.versions['comfyui']}; comfy-kitchen {args.versions['comfy_kitchen']}; {stamp}")
    print(header, flush=True)
    rows = []
    os.makedirs(args.out, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.dir) as workdir:
        started = time.perf_counter()
        for name in args.models:
            if args.deadline is not None and time.perf_counter() - started > args.deadline:
                rows.append({"model": name, "path": "all", "error": "skipped: --deadline reached"})
                continue
            rows += run_model(name, args, device, workdir)
            table = markdown(rows, header)
            with open(os.path.join(args.out, "host_int8.json"), "w") as f:
                json.dump({"header": header, "rows": rows}, f, indent=1)
            with open(os.path.join(args.out, "host_int8.md"), "w") as f:
                f.write(table + "\n")
    print(table)
    return 0 if all("step_ms" in r for r in rows) else 1


def _version(dist: str) -> str:
    try:
        from importlib.metadata import version
        return version(dist)
    except Exception:  # noqa: BLE001 - a source checkout without metadata
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
