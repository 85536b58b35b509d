"""Host time per INT8 layer under torch.compile: what a compiled graph pays around each ``octet::linear`` call.

Compiled Flux-dev on an H100 (2026-12-06) issued its step in 81.3 ms of host time against compiled bf16's 46.5,
and the profiler put 165 us of host time on each of its 314 ``octet::linear`` calls: the compiled step was
host-bound by the op's Python path, not by its kernels. This bench isolates that path: N dynamic W8A8 layers
whose plans' run functions are stubbed (an empty output, no kernel), so each row is host time alone:

  eager               the layers called as ComfyUI's eager step calls them (the cached plan)
  compiled <backend>  the same layers in one torch.compile'd graph (inductor = TorchCompileModel's default)
  op alone            torch.ops.octet.linear, as the compiled graph calls it
  op as custom_op     the same body declared with torch.library.custom_op (what octet::linear was until
                      2026-12-06): its autograd wrapper and per-device redispatch, side by side

    python3 bench/compiled_host_cost.py [--device cpu|cuda] [--layers 20] [--out out/bench]
    python3 bench/compiled_host_cost.py --real      # the plans' real kernels, bf16 3072 x 3072 layers at M = 16
                                                    # (Flux's width; GPU work far shorter than the host's)

Runs on the CPU (TRITON_INTERPRET is not needed: nothing launches); on a GPU host it measures that host's CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Optional

import torch
import torch._dynamo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import octet_pack  # noqa: E402


def per_call_us(fn, calls_per_fn: int, reps: int, rounds: int = 5) -> float:
    """Median over ``rounds`` of the host time per inner call (``fn`` makes ``calls_per_fn`` of them)."""
    for _ in range(max(10, reps // 10)):
        fn()
    times = []
    for _ in range(rounds):
        if torch.cuda.is_available():
            torch.cuda.synchronize()   # each round starts with the launch queue empty (--real launches kernels)
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        times.append((time.perf_counter() - t0) / reps / calls_per_fn * 1e6)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--layers", type=int, default=20)
    parser.add_argument("--reps", type=int, default=500)
    parser.add_argument("--backends", nargs="+", default=["inductor", "aot_eager"])
    parser.add_argument("--real", action="store_true",
                        help="keep the plans' kernels: 3072-wide bf16 layers at M=16 on a GPU (launch costs in)")
    parser.add_argument("--out", default=os.path.join(ROOT, "out", "bench"))
    args = parser.parse_args()

    octet_pack.load()
    from comfyui_octet import kernels, octet

    torch.set_num_threads(1)
    device = torch.device(args.device)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    n = args.layers
    width, dtype = (3072, torch.bfloat16) if args.real and device.type == "cuda" else (64, torch.float32)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(n)]).to(device, dtype).eval()
    octet.quantize_(model, octet.config_for_mode("dynamic"))
    for layer in model:
        layer.backend = "triton" if device.type == "cuda" else layer.backend   # INT8 at M = 16 too
    x = torch.randn(16 if args.real else 4, width, device=device, dtype=dtype)
    torch.set_grad_enabled(False)
    model(x)                       # plan each layer, then (unless --real) stub the plans' runs: host time only
    for layer in model if not args.real else ():
        plan = layer.plan(x)
        layer._plans[layer._signature(x)] = plan._replace(run=lambda x, static: torch.empty_like(x))
        layer._by_shape.clear()

    rows = {"eager": per_call_us(lambda: model(x), n, args.reps)}
    for backend in args.backends:
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=backend, fullgraph=True)
        rows[f"compiled {backend}"] = per_call_us(lambda: compiled(x), n, args.reps)

    first = model[0]
    op_args = (x, first.weight, first.current_weight_scale(), first.bias, first.pre_quant_scale,
               first._static_scale(x.device), first.act, first.backend, first.goal, first.op_owner)
    op = torch.ops.octet.linear.default
    rows["op alone"] = per_call_us(lambda: op(*op_args), 1, args.reps * 10)

    def body(x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor],
             smooth: Optional[torch.Tensor], static_scale: Optional[torch.Tensor], act: str, backend: str, goal: str,
             owner: int = -1) -> torch.Tensor:
        return kernels.ops.owner_of(owner, qweight, x).plan(x).run(x, static_scale)
    as_custom_op = torch.library.custom_op("octet_bench::linear", mutates_args=())(body)
    as_custom_op.register_fake(lambda x, qweight, *rest: x.new_empty((*x.shape[:-1], qweight.shape[0])))
    rows["op as custom_op"] = per_call_us(lambda: torch.ops.octet_bench.linear.default(*op_args), 1, args.reps * 10)

    what = f"{width}-wide {dtype} layers at M={x.shape[0]}, real kernels" if args.real else "plans' runs stubbed"
    header = f"card: {card}; torch {torch.__version__}; {n} layers, {what}; host us per layer call"
    print(header)
    for name, us in rows.items():
        print(f"[{card}] {name:22s} {us:7.2f} us")
    print(f"[{card}] op as custom_op / op alone: {rows['op as custom_op'] / rows['op alone']:.2f}x; "
          f"compiled inductor / eager: {rows.get('compiled inductor', float('nan')) / rows['eager']:.2f}x")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"compiled_host_cost{'_real' if args.real else ''}.json")
    with open(path, "w") as f:
        json.dump({"header": header, "card": card, "torch": torch.__version__, "layers": n, "us": rows}, f, indent=1)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
