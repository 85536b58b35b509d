"""Host time of a UNet's transformer stacks, the host's forward against Octet's lean one (octet/lean_blocks.py).

SDXL's stacks at 1024² (per step five of depth 2 at 4096 tokens, six of depth 10 at 1024 tokens: its 70
BasicTransformerBlocks), one stack of each kind, in four variants:
  bf16 host / bf16 lean: the float stack, host forward vs lean forward;
  octet host / octet lean: the same stack quantized (dynamic W8A8, Quantize Model's default) with the lean forward
  switched off (OCTET_LEAN_BLOCKS=0 when quantized) and on.
Per variant: host us per block (the calling thread's CPU time to issue one stack call, no synchronisation; on CUDA
the GPU runs behind)
and wall us per block (the same call with a synchronisation: what an eager step pays where it is host-bound). Rounds
interleave the variants (the lent hosts' CPU speed drifts, bench/eager_paired.py); each ratio is host / lean in the
same round, median over rounds; and Octet lean against the stock bf16 stack (what issue 13's eager target
compares), paired the same way.

On CUDA: SDXL's real widths and token counts (batch 2: cond and uncond), bf16, the host's attention_pytorch. On a CPU
(no GPU here): SDXL's block structure at tiny widths and 16 tokens, float32, so the Python is most of what is timed;
a proxy for the host time, not a GPU number. Writes JSON (default out/lean_blocks/).

    python3 bench/lean_blocks.py [--rounds 30] [--out DIR]
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import octet_pack  # noqa: E402

# SDXL at 1024² (latent 128²): (channels, heads, tokens, depth, stacks per step)
SDXL_STACKS = [(640, 10, 4096, 2, 2 + 3), (1280, 20, 1024, 10, 2 + 1 + 3)]
TINY = [(64, 2, 16, 2, 5), (64, 2, 16, 10, 6)]
VARIANTS = ("bf16 host", "bf16 lean", "octet host", "octet lean")


def build(channels, heads, depth, device, dtype, context_dim):
    import comfy.ops
    import torch
    from comfy.ldm.modules.attention import SpatialTransformer
    torch.manual_seed(0)
    st = SpatialTransformer(channels, heads, channels // heads, depth=depth, context_dim=context_dim,
                            use_linear=True, operations=comfy.ops.disable_weight_init)
    with torch.no_grad():
        for p in st.parameters():
            p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5 if p.dim() > 1 else torch.randn_like(p) * 0.02)
    return st.to(device=device, dtype=dtype).eval()


def variants(st):
    from comfyui_octet import octet
    from comfyui_octet.octet import lean_blocks
    out = {"bf16 host": st, "bf16 lean": copy.deepcopy(st)}
    lean_blocks.install(out["bf16 lean"])
    for name, switch in (("octet host", "0"), ("octet lean", "1")):
        os.environ["OCTET_LEAN_BLOCKS"] = switch
        m = copy.deepcopy(st)
        octet.quantize_(m, octet.DynamicW8A8Config())
        out[name] = m
    os.environ.pop("OCTET_LEAN_BLOCKS")
    return out


def time_call(fn, sync, reps):
    """(this thread's CPU seconds to issue one call, wall seconds per call with the work finished)."""
    sync()
    c0, t0 = time.thread_time(), time.perf_counter()
    for _ in range(reps):
        fn()
    c1 = time.thread_time()
    sync()
    return (c1 - c0) / reps, (time.perf_counter() - t0) / reps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--reps", type=int, default=5, help="stack calls per timing")
    parser.add_argument("--out", default=os.path.join(ROOT, "out", "lean_blocks"))
    args = parser.parse_args()

    import torch
    cuda = torch.cuda.is_available()
    octet_pack.load(comfy=True, cpu=not cuda)
    import comfy.ldm.modules.attention as attention
    attention.optimized_attention = attention.attention_pytorch     # the host's choice on CUDA; CPU hosts pick
    device = torch.device("cuda" if cuda else "cpu")                 # split / sub-quadratic attention
    dtype = torch.bfloat16 if cuda else torch.float32
    if not cuda:
        torch.set_num_threads(1)
    card = torch.cuda.get_device_name() if cuda else "cpu (proxy: tiny widths)"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header = f"card: {card}; torch {torch.__version__}; comfyui stacks as SDXL 1024² runs them; {stamp}"
    print(header, flush=True)
    context_dim = 2048 if cuda else 64
    rows = []
    for channels, heads, tokens, depth, per_step in (SDXL_STACKS if cuda else TINY):
        st = build(channels, heads, depth, device, dtype, context_dim)
        side = int(tokens ** 0.5)
        g = torch.Generator(device=device).manual_seed(1)
        x = torch.randn(2, channels, side, tokens // side, device=device, dtype=dtype, generator=g)
        ctx = torch.randn(2, 77, context_dim, device=device, dtype=dtype, generator=g)
        models = variants(st)
        calls = {v: (lambda m=m: m(x, context=ctx, transformer_options={})) for v, m in models.items()}
        with torch.inference_mode():
            want = calls["bf16 host"]()
            assert torch.equal(calls["bf16 lean"](), want), "lean bf16 stack differs from the host's"
            for v in ("octet host", "octet lean"):
                calls[v]()                            # plans made, kernels tuned
            assert torch.equal(calls["octet lean"](), calls["octet host"]()), "lean INT8 stack differs"
            host = {v: [] for v in VARIANTS}
            wall = {v: [] for v in VARIANTS}
            for r in range(args.rounds):
                order = VARIANTS[r % 4:] + VARIANTS[:r % 4]
                for v in order:
                    h, w = time_call(calls[v], sync, args.reps)
                    host[v].append(h * 1e6 / depth)
                    wall[v].append(w * 1e6 / depth)
        for kind in ("bf16", "octet"):
            ratios = [a / b for a, b in zip(host[f"{kind} host"], host[f"{kind} lean"])]
            wall_ratios = [a / b for a, b in zip(wall[f"{kind} host"], wall[f"{kind} lean"])]
            saved_ms = (statistics.median(host[f"{kind} host"]) - statistics.median(host[f"{kind} lean"])) \
                * depth * per_step / 1000
            row = {"card": card, "channels": channels, "heads": heads, "tokens": tokens, "depth": depth,
                   "stacks_per_step": per_step, "variant": kind,
                   "host_us_per_block": statistics.median(host[f"{kind} host"]),
                   "lean_us_per_block": statistics.median(host[f"{kind} lean"]),
                   "host_wall_us_per_block": statistics.median(wall[f"{kind} host"]),
                   "lean_wall_us_per_block": statistics.median(wall[f"{kind} lean"]),
                   "host_over_lean": statistics.median(ratios), "wall_host_over_lean": statistics.median(wall_ratios),
                   "host_ms_saved_per_sdxl_step": saved_ms, "rounds": args.rounds, "versions":
                   {"torch": torch.__version__}}
            rows.append(row)
            print(f"[{card}] {kind} stack {channels}ch x{depth} @{tokens} tokens: host {row['host_us_per_block']:.1f}"
                  f" -> lean {row['lean_us_per_block']:.1f} us/block CPU ({row['host_over_lean']:.2f}x), wall "
                  f"{row['host_wall_us_per_block']:.1f} -> {row['lean_wall_us_per_block']:.1f} us/block "
                  f"({row['wall_host_over_lean']:.2f}x); {saved_ms:.2f} ms of host time per SDXL step", flush=True)
        # What issue 13's eager target compares: Octet's stack (lean) against the stock bf16 stack (host forward).
        vs = [a / b for a, b in zip(host["bf16 host"], host["octet lean"])]
        vs_wall = [a / b for a, b in zip(wall["bf16 host"], wall["octet lean"])]
        rows.append({"card": card, "channels": channels, "heads": heads, "tokens": tokens, "depth": depth,
                     "stacks_per_step": per_step, "variant": "octet lean vs bf16 host",
                     "host_over_lean": statistics.median(vs), "wall_host_over_lean": statistics.median(vs_wall),
                     "rounds": args.rounds, "versions": {"torch": torch.__version__}})
        print(f"[{card}] octet lean vs stock bf16, stack {channels}ch x{depth}: host {statistics.median(vs):.2f}x, "
              f"wall {statistics.median(vs_wall):.2f}x (per block, paired by round)", flush=True)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "lean_blocks.json")
    with open(path, "w") as f:
        json.dump({"header": header, "rows": rows}, f, indent=1)
    print(f"[{card}] wrote {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
