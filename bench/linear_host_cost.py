"""Does running an Octet model make the process's own cuBLAS / allocator calls dearer to issue?

Why: a GPU cProfile of eager SDXL steps (H200, 2026-12-05, docs/BENCHMARKS.md) put ``torch._C._nn.linear`` at
~44 us of host time per call in Octet's step against ~23 us in bf16's (the same kept-bf16 layers, same shapes),
and ``torch.empty`` at ~11 us per call. This times bare calls at SDXL shapes (host us per call, no sync inside
the loop): before any model ran, after a bf16 SDXL step, after an Octet SDXL step (Quantize Model's dynamic
defaults), and after both again; a row per phase. On CPU: tiny shapes (a smoke test).

    python3 bench/linear_host_cost.py [--out DIR]
    python3 bench/linear_host_cost.py --gemm-ways     # ways to issue one bf16 GEMM, by host time (no model)
    python3 bench/linear_host_cost.py --mlp           # an MLP with the GELU in fc1's epilogue vs the host's forward

``--gemm-ways``: host us per call of the ways to issue SDXL's 4096x640x640 bf16 linear (F.linear with its bias:
cuBLASLt with the bias in its epilogue, which queries Lt's heuristics on every call; without the bias; mm; addmm)
and of an Octet W8A8 layer's bound call at the same shape, then the same in a child process with
``DISABLE_ADDMM_CUDA_LT=1`` (PyTorch reads it once): whether the kept-bf16 layers of a host-bound eager step have a
cheaper way to cuBLAS than the host's.

``--attention``: host and GPU us per call of ``F.scaled_dot_product_attention`` through each of PyTorch's backends
(cuDNN, the host's pick on an H200; flash; memory-efficient) at SDXL's and SD3.5's attention shapes (batch 1),
with each output's largest difference from cuDNN's: an eager SDXL step makes 140 attention calls, host-bound.

``--mlp``: host us (and wall us, synchronised) per call of SD3.5-medium's image-stream ``Mlp`` (the host's class,
4096 tokens, 1536 -> 6144 -> 1536; fc1, GELU(tanh), dropouts, fc2) quantized dynamic W8A8, through its chained forward (the GELU
in fc1's GEMM epilogue, octet/fusion.py) and through the host's forward (``OCTET_FUSED_MLP=0``), in alternating
rounds: an eager SD3.5 step makes 47 such calls, host-bound. On a CPU: tiny shapes, the plans' runs stood in for (a
preallocated output), so the rows are the Python each path runs.
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


def _setup(comfy):
    """(cuda, device, dtype, sync, card, (m, k, n), (x, w, b)): SDXL's 4096x640x640 bf16 linear on a GPU, a tiny fp32 one
    on a CPU (a smoke test); the pack loaded (with the host where ``comfy``; not at all where None)."""
    import torch
    cuda = torch.cuda.is_available()
    if comfy is not None:
        octet_pack.load(comfy=comfy, cpu=not cuda)
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    m, k, n = (4096, 640, 640) if cuda else (64, 32, 32)
    tensors = (torch.randn(m, k, device=dev, dtype=dtype), torch.randn(n, k, device=dev, dtype=dtype),
               torch.randn(n, device=dev, dtype=dtype))
    return (cuda, dev, dtype, torch.cuda.synchronize if cuda else (lambda: None),
            torch.cuda.get_device_name() if cuda else "cpu", (m, k, n), tensors)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(e2e.ROOT, "out", "linear_host_cost"))
    parser.add_argument("--gemm-ways", action="store_true", help="host time of ways to issue one bf16 GEMM")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--attention", action="store_true", help="host / GPU time of SDPA's backends")
    parser.add_argument("--mlp", action="store_true", help="host time of a chained MLP vs the host's forward")
    args = parser.parse_args()
    if args.attention:
        return attention_backends(args)
    if args.mlp:
        return mlp_host(args)
    if args.gemm_ways:
        return gemm_ways(args)
    import torch
    cuda, dev, dtype, sync, card, (m, k, n), (x, w, b) = _setup(comfy=True)
    from comfyui_octet import octet
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


def attention_backends(args) -> int:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    cuda, dev, dtype, sync, card, _, _ = _setup(comfy=None)
    # (name, batch, heads, query tokens, key tokens, head dim)
    shapes = [("SDXL self-attn 64x64 latent", 1, 10, 4096, 4096, 64), ("SDXL cross-attn 64x64", 1, 10, 4096, 77, 64),
              ("SDXL self-attn 32x32 latent", 1, 20, 1024, 1024, 64), ("SDXL cross-attn 32x32", 1, 20, 1024, 77, 64),
              ("SD3.5 joint attention", 1, 24, 4429, 4429, 64)]
    if not cuda:
        shapes = [(n, b, h, min(q, 64), min(k, 64), d) for n, b, h, q, k, d in shapes]
    backends = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    rows = []
    for name, b, h, lq, lk, d in shapes:
        g = torch.Generator(device=dev).manual_seed(0)
        q = torch.randn(b, h, lq, d, device=dev, dtype=dtype, generator=g)
        k = torch.randn(b, h, lk, d, device=dev, dtype=dtype, generator=g)
        v = torch.randn(b, h, lk, d, device=dev, dtype=dtype, generator=g)
        ref = None
        for backend, which in backends.items():
            if backend == "math" and cuda:
                continue
            try:
                with sdpa_kernel([which]):
                    out = F.scaled_dot_product_attention(q, k, v)
                    host = host_us(lambda: F.scaled_dot_product_attention(q, k, v), sync)
                    wall = host_us(lambda: F.scaled_dot_product_attention(q, k, v), sync, reps=50) if not cuda \
                        else _gpu_us(lambda: F.scaled_dot_product_attention(q, k, v))
            except RuntimeError as exc:
                print(f"[{card}] {name}: {backend} unavailable ({str(exc).splitlines()[0][:80]})", flush=True)
                continue
            ref = out if ref is None else ref
            _attention_row(rows, card, name, backend, host, wall, out, ref)
        # The backends' own ops called directly: SDPA's per-call backend selection skipped.
        aten = torch.ops.aten
        direct = {"cudnn op": lambda: aten._scaled_dot_product_cudnn_attention.default(q, k, v, None, False)[0],
                  "flash op": lambda: aten._scaled_dot_product_flash_attention.default(q, k, v)[0]}
        for backend, fn in direct.items() if cuda and ref is not None else ():
            try:
                out = fn()
            except RuntimeError as exc:
                print(f"[{card}] {name}: {backend} unavailable ({str(exc).splitlines()[0][:80]})", flush=True)
                continue
            _attention_row(rows, card, name, backend, host_us(fn, sync), _gpu_us(fn), out, ref)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"attention_backends_{'cuda' if cuda else 'cpu'}.json"), "w") as f:
        json.dump({"card": card, "rows": rows, "versions": {"torch": torch.__version__}}, f, indent=1)
    return 0


def _attention_row(rows, card, name, backend, host, wall, out, ref) -> None:
    diff = (out.float() - ref.float()).abs().max().item()
    rows.append({"shape": name, "backend": backend, "host_us": host, "gpu_us": wall, "max_diff": diff})
    print(f"[{card}] {name:30s} {backend:9s} host {host:6.1f} us  GPU {wall:7.1f} us  max |diff| {diff:.3g}", flush=True)


def _gpu_us(fn, reps: int = 50) -> float:
    """GPU time per call: CUDA events around ``reps`` back-to-back calls (the host runs ahead)."""
    import torch
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / reps


def mlp_host(args) -> int:
    import torch
    if not torch.cuda.is_available():
        # The CPU proxy plans on Triton's backend, which takes CPU tensors only under its interpreter (read before
        # the kernels are imported); no kernel runs (the plans' runs are stood in for below).
        os.environ["TRITON_INTERPRET"] = "1"
    cuda, dev, dtype, sync, card, _, _ = _setup(comfy=True)
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.mmdit import Mlp
    from comfyui_octet import octet
    from comfyui_octet.kernels.backends import triton_backend
    m, d, h = (4096, 1536, 6144) if cuda else (16, 32, 64)
    torch.manual_seed(0)
    # The host's own SD3 Mlp, built as its JointBlock builds it (comfy.ops leaves the weights to the loader).
    mlp = Mlp(in_features=d, hidden_features=h, act_layer=lambda: torch.nn.GELU(approximate="tanh"), drop=0,
              dtype=dtype, device=dev, operations=comfy.ops.disable_weight_init).eval()
    with torch.no_grad():
        for p in mlp.parameters():
            p.normal_(0, d ** -0.5)
    octet.quantize_(mlp, octet.DynamicW8A8Config(backend="auto" if cuda else "triton"))
    x = torch.randn(1, m, d, device=dev, dtype=dtype)
    if not cuda:   # the Python each path runs: the plans' kernels stood in for by a preallocated output
        outs = {h: torch.randn(1, m, h), d: torch.randn(1, m, d)}
        triton_backend._W8A8Linear.__call__ = lambda self, x, static: outs[self.n]
    saved = os.environ.get("OCTET_FUSED_MLP")
    variants = {"chained (GELU in fc1's epilogue)": "1", "host forward (OCTET_FUSED_MLP=0)": "0"}
    host = {v: [] for v in variants}
    wall = {v: [] for v in variants}
    try:
        with torch.inference_mode():
            for value in variants.values():      # plans made, kernels tuned, calls bound
                os.environ["OCTET_FUSED_MLP"] = value
                for _ in range(3):
                    mlp(x)
            plan = mlp.fc1.plan(x)
            for r in range(15):
                for v in list(variants)[r % 2:] + list(variants)[:r % 2]:
                    os.environ["OCTET_FUSED_MLP"] = variants[v]
                    host[v].append(host_us(lambda: mlp(x), sync, reps=50, rounds=1))
                    sync()
                    t0 = time.perf_counter()
                    for _ in range(20):
                        mlp(x)
                    sync()
                    wall[v].append((time.perf_counter() - t0) / 20 * 1e6)
    finally:
        if saved is None:
            os.environ.pop("OCTET_FUSED_MLP", None)
        else:
            os.environ["OCTET_FUSED_MLP"] = saved
    row = {"card": card, "shape": [m, d, h], "fc1_plan": getattr(plan.impl, "name", str(plan.impl)),
           "versions": {"torch": torch.__version__},
           **{f"host_us {v}": statistics.median(host[v]) for v in variants},
           **{f"wall_us {v}": statistics.median(wall[v]) for v in variants}}
    for v in variants:
        print(f"[{card}] Mlp {m}x{d}->{h} {v:34s} host {row[f'host_us {v}']:7.1f} us, wall {row[f'wall_us {v}']:8.1f} "
              f"us per call (fc1's plan: {row['fc1_plan']})", flush=True)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"mlp_host_{'cuda' if cuda else 'cpu'}.json")
    with open(path, "w") as f:
        json.dump({"rows": [row]}, f, indent=1)
    print(f"wrote {path}")
    return 0


def gemm_ways(args) -> int:
    import subprocess
    import torch
    cuda, dev, dtype, sync, card, (m, k, n), (x, w, b) = _setup(comfy=False)
    from comfyui_octet import octet
    wt = w.t()
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
