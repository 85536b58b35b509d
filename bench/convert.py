"""Peak memory and time of the streaming converter on a full-size model file.

Run from the repository root:  .venv/bin/python bench/convert.py [--model sdxl] [--keep] [--mode dynamic]

1. Writes a random SDXL UNet (ComfyUI's own UNetModel with the SDXL config, built on the meta
   device for its key names and shapes: 2.57 B parameters, bf16, ~4.8 GiB) tensor by tensor
   with Octet's StreamWriter, so generating it needs no more memory than its largest tensor.
2. Runs ``python -m scripts.convert`` on it in a child process, for each kind (octet, portable),
   and reads the child's peak resident memory (getrusage RUSAGE_CHILDREN, ru_maxrss) and wall time.
3. Prints peak RSS / source file size and output / source size side by side and writes
   docs/bench/convert_<model>.json. The big files are deleted afterwards unless --keep.
Random weights: the point is memory and time, which do not depend on the values.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import octet_pack  # noqa: E402

from e2e import SDXL  # noqa: E402  (the full-size SDXL config the e2e bench builds)


def sdxl_shapes() -> dict[str, tuple[int, ...]]:
    """Key -> shape of ComfyUI's SDXL UNet (diffusion_models file layout), without allocating it."""
    octet_pack.load(comfy=True, cpu=True)
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    with torch.device("meta"):
        unet = UNetModel(**SDXL, dtype=torch.bfloat16, device="meta", operations=comfy.ops.disable_weight_init)
    return {k: tuple(v.shape) for k, v in unet.state_dict().items()}


def write_random(path: str, shapes: dict, dtype=torch.bfloat16, seed: int = 0, device: str = "cpu",
                 note: str = "random SDXL UNet") -> int:
    """A random model file written tensor by tensor (memory: one tensor). ``device="cuda"`` draws the
    numbers on the GPU, ~10x faster for a 12 B-parameter Flux."""
    from comfyui_octet.octet.streamfile import StreamWriter
    g = torch.Generator(device).manual_seed(seed)
    plan = {k: (dtype, s) for k, s in shapes.items()}
    with StreamWriter(path, plan, {"bench": note}) as w:
        for k, s in shapes.items():
            fan_in = max(1, int(torch.tensor(s[1:]).prod().item()) if len(s) > 1 else 1)
            w.write(k, (torch.randn(s, generator=g, device=device) / fan_in ** 0.5).to(dtype).cpu())
    return sum(int(torch.tensor(s).prod().item()) for s in shapes.values())


# The converter's command line, run as `python -m scripts.convert` is, reporting its own peak RSS
# (getrusage(RUSAGE_SELF).ru_maxrss, KiB on Linux) when it ends.
_WRAPPER = """
import resource, runpy, sys
sys.argv = ["scripts.convert"] + sys.argv[1:]
try:
    runpy.run_module("scripts.convert", run_name="__main__")
finally:
    print("PEAK_RSS_KIB=%d" % resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
"""


def run_converter(src: str, out: str, args: list[str]) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _WRAPPER, src, out, "--quiet", "--overwrite", *args],
                          cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    peak = [int(line.split("=")[1]) for line in proc.stderr.splitlines() if line.startswith("PEAK_RSS_KIB=")]
    if proc.returncode != 0 or not peak:
        raise SystemExit(f"converter failed: {proc.stderr}")
    return {"wall_s": round(wall, 1), "peak_rss_bytes": peak[0] * 1024, "output_bytes": os.path.getsize(out),
            "stdout": proc.stdout.strip()}


def import_baseline() -> int:
    """Peak RSS of a process that only imports what the converter imports (torch, Triton, Octet)."""
    code = ("import resource, sys; sys.path.insert(0, 'scripts'); import octet_pack; octet_pack.load(); "
            "from comfyui_octet.octet import convert; "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) * 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=["sdxl"], default="sdxl")
    ap.add_argument("--mode", default="dynamic")
    ap.add_argument("--dir", default=os.path.join(ROOT, "out", "bench_convert"))
    ap.add_argument("--keep", action="store_true", help="keep the generated source and outputs")
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "bench"))
    args = ap.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    free = shutil.disk_usage(args.dir).free
    if free < 16 * 2**30:
        raise SystemExit(f"needs ~16 GiB free in {args.dir}; {free / 2**30:.1f} GiB free")
    src = os.path.join(args.dir, f"random_{args.model}_bf16.safetensors")
    shapes = sdxl_shapes()
    t0 = time.perf_counter()
    params = write_random(src, shapes)
    gen_s = time.perf_counter() - t0
    src_bytes = os.path.getsize(src)
    print(f"source: {src} {params / 1e9:.3f} B params, {src_bytes / 2**30:.2f} GiB, written in {gen_s:.0f} s")

    baseline = import_baseline()
    print(f"imports alone: peak RSS {baseline / 2**20:.0f} MiB")
    runs = {}
    for kind in ("octet", "portable"):
        out = os.path.join(args.dir, f"random_{args.model}_{kind}.safetensors")
        runs[kind] = run_converter(src, out, ["--mode", args.mode, "--kind", kind])
        r = runs[kind]
        print(f"{kind:9s} wall {r['wall_s']:7.1f} s   peak RSS {r['peak_rss_bytes'] / 2**20:8.0f} MiB "
              f"= {r['peak_rss_bytes'] / src_bytes:.3f}x of the source file   output {r['output_bytes'] / 2**30:.2f} GiB "
              f"= {r['output_bytes'] / src_bytes:.3f}x   (converting: +{(r['peak_rss_bytes'] - baseline) / 2**20:.0f} MiB "
              f"over the imports)")
    result = {
        "bench": "convert", "model": args.model, "mode": args.mode, "params": params, "source_bytes": src_bytes,
        "source_dtype": "bfloat16", "generate_s": round(gen_s, 1), "runs": runs,
        "import_baseline_rss_bytes": baseline,
        "peak_rss_over_source": {k: round(r["peak_rss_bytes"] / src_bytes, 4) for k, r in runs.items()},
        "output_over_source": {k: round(r["output_bytes"] / src_bytes, 4) for k, r in runs.items()},
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python bench/convert.py --model " + args.model + " --mode " + args.mode,
    }
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"convert_{args.model}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {path}")
    if not args.keep:
        for name in os.listdir(args.dir):
            if name.startswith(f"random_{args.model}"):
                os.remove(os.path.join(args.dir, name))


if __name__ == "__main__":
    main()
