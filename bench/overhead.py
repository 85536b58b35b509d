"""Host cost per INT8 layer call: what the per-signature plan buys in an eager ComfyUI step.

For bf16 ``nn.Linear`` and each Octet path (weight-only, dynamic, static; goal speed/memory) at
Flux-dev and SDXL shapes, M=16 and M=4096, it measures
  host us/call: CPU time to issue R calls back to back (no synchronisation inside the loop), and
  wall us/call: the same loop including the final synchronisation (what a step pays),
after a warm-up that builds the plan and autotunes. All numbers come from one process, with the
card, torch and Triton versions printed next to them; writes JSON (default docs/bench/).

    python3 bench/overhead.py [--reps 200] [--out docs/bench]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import octet_pack  # noqa: E402

SHAPES = [  # (name, K, N)
    ("flux attn qkv", 3072, 9216), ("flux mlp fc1", 3072, 12288), ("flux mlp fc2", 12288, 3072),
    ("flux attn out", 3072, 3072), ("sdxl attn q 640", 640, 640), ("sdxl attn 1280", 1280, 1280),
    ("sdxl ff 1280", 1280, 10240),
]
PATHS = [  # (label, act, backend, goal, environment while the layer plans)
    ("octet weight_only", "none", "auto", "speed", {}),
    # Weight-only without its bound call at large M (triton_w8a16.W8A16Linear._bind): the general path.
    ("octet weight_only, unbound", "none", "auto", "speed", {"OCTET_BIND": "0"}),
    # ... and bound, its float weight a fresh allocation per call instead of the stream's scratch (scratch.py).
    ("octet weight_only, no scratch", "none", "auto", "speed", {"OCTET_SCRATCH": "0"}),
    ("octet dynamic", "dynamic", "auto", "speed", {}),
    ("octet dynamic triton", "dynamic", "triton", "speed", {}),
    # The same layer without its bound call (each call through the general path: triton_backend._bind),
    # launching through Triton's Python launcher (OCTET_C_LAUNCH=0) and through Triton's
    # own dispatch (OCTET_FAST_LAUNCH=0): what each layer of kernels/backends/triton_launch.py saves,
    # measured side by side in one run.
    ("octet dynamic triton, unbound", "dynamic", "triton", "speed", {"OCTET_BIND": "0"}),
    ("octet dynamic triton, Python launcher", "dynamic", "triton", "speed", {"OCTET_C_LAUNCH": "0"}),
    ("octet dynamic triton, Triton dispatch", "dynamic", "triton", "speed", {"OCTET_FAST_LAUNCH": "0"}),
    # ... and with fresh allocations for its codes and scales instead of the stream's scratch (scratch.py).
    ("octet dynamic triton, no scratch", "dynamic", "triton", "speed", {"OCTET_SCRATCH": "0"}),
    ("octet static triton", "static", "triton", "speed", {}),
    ("octet dynamic memory", "dynamic", "auto", "memory", {}),
]


def card_header(mode: str = "") -> tuple[str, str, str]:
    """(GPU name, UTC stamp, the header line printed next to every timing: card, versions, mode, time)."""
    import torch
    import triton
    card = torch.cuda.get_device_name()
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return card, stamp, f"card: {card}; torch {torch.__version__}; triton {triton.__version__}; {mode}{stamp}"


def measure(fn, reps: int, rounds: int = 5) -> tuple[float, float]:
    """(host, wall) us per call: the median over ``rounds`` rounds of ``reps`` calls each (the GPU hosts'
    CPU time per call varies by 20-40% from one moment to the next; a median of rounds keeps one slow
    moment from deciding a row)."""
    import statistics
    import torch
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    host, wall = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        host.append((t1 - t0) / reps * 1e6)
        wall.append((t2 - t0) / reps * 1e6)
    return statistics.median(host), statistics.median(wall)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "bench"))
    args = parser.parse_args()
    octet_pack.load()
    import torch
    from comfyui_octet.kernels.torch_ref import scale_from_absmax
    from comfyui_octet.kernels.backends import scratch
    from comfyui_octet.octet.modules import QuantLinear, plan_summary

    if not torch.cuda.is_available():
        print("bench/overhead.py measures GPU launch cost: it needs a CUDA device.")
        return 1
    card, stamp, header = card_header("eager; ")
    print(header, flush=True)
    g = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for name, k, n in SHAPES:
        lin = torch.nn.Linear(k, n, device="cuda", dtype=torch.bfloat16)
        for m in (16, 4096):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=g)
            with torch.no_grad():
                host, wall = measure(lambda: lin(x), args.reps)
                rows.append({"shape": name, "m": m, "k": k, "n": n, "path": "bf16 nn.Linear", "backend": "cublas",
                             "host_us": host, "wall_us": wall})
                for label, act, backend, goal, env in PATHS:
                    q = QuantLinear.from_float(lin, act, backend, goal=goal)
                    if act == "static":
                        q.set_static_scales(scale_from_absmax(x.abs().amax()).reshape(1))
                    model = torch.nn.Sequential(q)
                    # Read when the layer plans (its first call, inside measure's warm-up).
                    saved = {name: os.environ.get(name) for name in env}
                    os.environ.update(env)
                    scratch.read_environment()   # read at import, not when the layer plans
                    host, wall = measure(lambda: model(x), args.reps)
                    for switch, value in saved.items():
                        if value is None:
                            os.environ.pop(switch)
                        else:
                            os.environ[switch] = value
                    scratch.read_environment()
                    chosen = plan_summary(model)["layers"]["0"]["backends"]
                    rows.append({"shape": name, "m": m, "k": k, "n": n, "path": label, "backend": ",".join(chosen),
                                 "host_us": host, "wall_us": wall,
                                 "extra_bytes": plan_summary(model)["extra_bytes"]})
            for r in rows[-(len(PATHS) + 1):]:
                print(f"[{card}] {r['shape']:>16} M={m:<5} {r['path']:<38} {r['backend']:<8} "
                      f"host {r['host_us']:7.1f} us  wall {r['wall_us']:8.1f} us", flush=True)
    os.makedirs(args.out, exist_ok=True)
    slug = card.lower().replace("nvidia ", "").split()[0]
    path = os.path.join(args.out, f"overhead_{slug}_{stamp[:10]}.json")
    with open(path, "w") as f:
        json.dump({"header": header, "rows": rows}, f, indent=1)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
