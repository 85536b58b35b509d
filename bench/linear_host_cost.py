"""Does running an Octet model make the process's own cuBLAS / allocator calls dearer to issue?

Why: a GPU cProfile of eager SDXL steps (H200, 2026-12-05, docs/BENCHMARKS.md) put ``torch._C._nn.linear`` at
~44 us of host time per call in Octet's step against ~23 us in bf16's (the same kept-bf16 layers, same shapes),
and ``torch.empty`` at ~11 us per call. This times bare calls at SDXL shapes (host us per call, no sync inside
the loop): before any model ran, after a bf16 SDXL step, after an Octet SDXL step (Quantize Model's dynamic
defaults), and after both again; a row per phase. On CPU: tiny shapes (a smoke test).

    python3 bench/linear_host_cost.py [--out DIR]
    python3 bench/linear_host_cost.py --gemm-ways     # ways to issue one bf16 GEMM, by host time (no model)

``--gemm-ways``: host us per call of the ways to issue SDXL's 4096x640x640 bf16 linear (F.linear with its bias:
cuBLASLt with the bias in its epilogue, which queries Lt's heuristics on every call; without the bias; mm; addmm)
and of an Octet W8A8 layer's bound call at the same shape, then the same in a child process with
``DISABLE_ADDMM_CUDA_LT=1`` (PyTorch reads it once): whether the kept-bf16 layers of a host-bound eager step have a
cheaper way to cuBLAS than the host's.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import e2e  # noqa: E402
from e2e import octet_pack  # noqa: E402


def host_us(fn, sync, reps=200, rounds=7) -> float:
    vals = []
    for _ in range(rounds):
        sync()
        t0 = time.thread_time()
        for _ in range(reps):
            fn()
        vals.append((time.thread_time() - t0) / reps * 1e6)
        sync()
    return statistics.median(vals)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(e2e.ROOT, "out", "linear_host_cost"))
    parser.add_argument("--gemm-ways", action="store_true", help="host time of ways to issue one bf16 GEMM")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.gemm_ways:
        return gemm_ways(args)
    import torch
    cuda = torch.cuda.is_available()
    octet_pack.load(comfy=True, cpu=not cuda)
    from comfyui_octet import octet
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    card = torch.cuda.get_device_name() if cuda else "cpu"
    m, k, n = (4096, 640, 640) if cuda else (64, 32, 32)
    x = torch.randn(m, k, device=dev, dtype=dtype)
    w = torch.randn(n, k, device=dev, dtype=dtype)
    b = torch.randn(n, device=dev, dtype=dtype)
    calls = {f"F.linear {m}x{k}x{n}": lambda: torch.nn.functional.linear(x, w, b),
             f"torch.empty {m}x{k}": lambda: torch.empty((m, k), device=dev, dtype=dtype),
             "x + x": lambda: x + x}
    rows = []

    def phase(name):
        row = {"phase": name, "card": card, **{what: host_us(fn, sync) for what, fn in calls.items()}}
        rows.append(row)
        print(f"[{card}] {name}: " + ", ".join(f"{k} {v:.1f} us" for k, v in row.items() if k not in ("phase", "card")),
              flush=True)

    phase("before any model")
    bf16 = e2e.build("sdxl", "bf16", dev, not cuda)
    xs, sigma, kw = e2e.inputs("sdxl", dev, not cuda)
    e2e.time_steps(bf16, xs, sigma, kw, 3, 0)
    phase("after bf16 SDXL steps")
    q = e2e.build("sdxl", "bf16", dev, not cuda)
    with torch.no_grad():
        octet.quantize_(q.diffusion_model, octet.DynamicW8A8Config())
    e2e.time_steps(q, xs, sigma, kw, 3, 0)
    phase("after Octet SDXL steps")
    e2e.time_steps(bf16, xs, sigma, kw, 2, 0)
    phase("after bf16 SDXL steps again")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"linear_host_cost_{'cuda' if cuda else 'cpu'}.json")
    with open(path, "w") as f:
        json.dump({"rows": rows, "versions": {"torch": torch.__version__}}, f, indent=1)
    print(f"wrote {path}")
    return 0


def gemm_ways(args) -> int:
    import subprocess
    import torch
    cuda = torch.cuda.is_available()
    octet_pack.load(comfy=False, cpu=not cuda)
    from comfyui_octet import octet
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    card = torch.cuda.get_device_name() if cuda else "cpu"
    m, k, n = (4096, 640, 640) if cuda else (64, 32, 32)
    x = torch.randn(m, k, device=dev, dtype=dtype)
    w = torch.randn(n, k, device=dev, dtype=dtype)
    wt = w.t()
    b = torch.randn(n, device=dev, dtype=dtype)
    layer = torch.nn.Sequential(torch.nn.Linear(k, n)).to(dev, dtype)
    octet.quantize_(layer, octet.DynamicW8A8Config())
    ql = layer[0]
    ways = {"F.linear(x, w, b)": lambda: torch.nn.functional.linear(x, w, b),
            "F.linear(x, w)": lambda: torch.nn.functional.linear(x, w),
            "torch.mm(x, w.t())": lambda: torch.mm(x, wt),
            "torch.addmm(b, x, w.t())": lambda: torch.addmm(b, x, wt),
            "F.linear(x, w).add_(b)": lambda: torch.nn.functional.linear(x, w).add_(b),
            "torch.empty (the output alone)": lambda: torch.empty((m, n), device=dev, dtype=dtype)}
    if cuda and not args.child:
        with torch.inference_mode():
            ql(x)
            ql(x)
        ways["Octet W8A8 layer, bound call"] = lambda: ql(x)
    env = "DISABLE_ADDMM_CUDA_LT=1" if args.child else "default"
    with torch.inference_mode():
        row = {"card": card, "env": env, "shape": [m, k, n], **{what: host_us(fn, sync) for what, fn in ways.items()}}
    for what, us in row.items():
        if what not in ("card", "env", "shape"):
            print(f"[{card}] {env:24s} {what:34s} {us:6.1f} us host per call", flush=True)
    rows = [row]
    if not args.child:
        child = subprocess.run([sys.executable, os.path.abspath(__file__), "--gemm-ways", "--child", "--out", args.out],
                               env={**os.environ, "DISABLE_ADDMM_CUDA_LT": "1"}, capture_output=True, text=True)
        print(child.stdout, end="", flush=True)
        if child.returncode:
            print(child.stderr[-2000:], flush=True)
        else:
            with open(os.path.join(args.out, "gemm_ways_child.json")) as f:
                rows.append(json.load(f))
    os.makedirs(args.out, exist_ok=True)
    name = "gemm_ways_child.json" if args.child else f"gemm_ways_{'cuda' if cuda else 'cpu'}.json"
    with open(os.path.join(args.out, name), "w") as f:
        json.dump(row if args.child else {"rows": rows, "versions": {"torch": torch.__version__}}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
