"""Host time of a UNet's transformer stacks and SD3's joint blocks, the host's forward against Octet's lean one
(octet/lean_blocks.py).

Cases, one module of each kind per step's pattern:
  SDXL at 1024²: per step five stacks of depth 2 at 4096 tokens and six of depth 10 at 1024 tokens (its 70
  BasicTransformerBlocks); SD3.5-medium at 1024²: 13 joint blocks with the extra image self-attention and 11
  without (4096 image + 333 text tokens).
Four variants each:
  bf16 host / bf16 lean: the float module, host forward vs lean forward;
  octet host / octet lean: the same module quantized (dynamic W8A8, Quantize Model's default) with the lean forward
  switched off (OCTET_LEAN_BLOCKS=0 when quantized) and on.
Per variant: host us per block (the calling thread's CPU time to issue one call, no synchronisation; on CUDA the
GPU runs behind) and wall us per block (the same call with a synchronisation: what an eager step pays where it is
host-bound). Rounds interleave the variants (the lent hosts' CPU speed drifts, bench/eager_paired.py); each ratio
is host / lean in the same round, median over rounds; and Octet lean against the stock bf16 module (what issue
13's eager target compares), paired the same way. Also a switch read (kernels/switches.py) against os.environ.get.

On CUDA: the real widths and token counts (batch 2: cond and uncond), bf16, the host's attention_pytorch. On a CPU
(no GPU here): the same block structure at tiny widths and token counts, float32, so the Python is most of what is
timed; a proxy for the host time, not a GPU number. Writes JSON (default out/lean_blocks/).

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

# (name, family, width, heads, depth or x_block_self_attn, tokens, context tokens, blocks per step: CUDA)
CASES = [("sdxl 640ch x2", "sdxl", 640, 10, 2, 4096, 77, 10), ("sdxl 1280ch x10", "sdxl", 1280, 20, 10, 1024, 77, 60),
         ("sd3.5 joint, x self-attn", "sd3", 1536, 24, True, 4096, 333, 13),
         ("sd3.5 joint", "sd3", 1536, 24, False, 4096, 333, 11)]
# The CPU proxy: the same structure, tiny.
TINY = [("sdxl 640ch x2", "sdxl", 64, 2, 2, 16, 8, 10), ("sdxl 1280ch x10", "sdxl", 64, 2, 10, 16, 8, 60),
        ("sd3.5 joint, x self-attn", "sd3", 64, 2, True, 16, 8, 13), ("sd3.5 joint", "sd3", 64, 2, False, 16, 8, 11)]
VARIANTS = ("bf16 host", "bf16 lean", "octet host", "octet lean")


def build(family, width, heads, depth, device, dtype, context_dim):
    import comfy.ops
    import torch
    torch.manual_seed(0)
    ops = comfy.ops.disable_weight_init
    if family == "sdxl":
        from comfy.ldm.modules.attention import SpatialTransformer
        m = SpatialTransformer(width, heads, width // heads, depth=depth, context_dim=context_dim, use_linear=True,
                               operations=ops)
    else:
        from comfy.ldm.modules.diffusionmodules.mmdit import JointBlock
        m = JointBlock(width, heads, mlp_ratio=4.0, qkv_bias=True, attn_mode="torch", pre_only=False, rmsnorm=False,
                       scale_mod_only=False, swiglu=False, qk_norm="rms", x_block_self_attn=depth, dtype=None,
                       device=None, operations=ops)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5 if p.dim() > 1 else torch.randn_like(p) * 0.02)
    return m.to(device=device, dtype=dtype).eval()


def inputs(family, width, tokens, context_tokens, context_dim, device, dtype):
    """The module's call on batch-2 inputs (cond and uncond)."""
    import torch
    g = torch.Generator(device=device).manual_seed(1)
    if family == "sdxl":
        side = int(tokens ** 0.5)
        x = torch.randn(2, width, side, tokens // side, device=device, dtype=dtype, generator=g)
        ctx = torch.randn(2, context_tokens, context_dim, device=device, dtype=dtype, generator=g)
        return lambda m: m(x, context=ctx, transformer_options={})
    x = torch.randn(2, tokens, width, device=device, dtype=dtype, generator=g)
    ctx = torch.randn(2, context_tokens, width, device=device, dtype=dtype, generator=g)
    c = torch.randn(2, width, device=device, dtype=dtype, generator=g)
    return lambda m: m(ctx, x, c=c, use_checkpoint=False, transformer_options={})


def same(a, b, exact: bool = True) -> bool:
    """Bit for bit (``exact``), else within the dtype's rounding (SD3's joint block where its q/k/v preparation is
    the kernel's, triton_rope.QKVHeads: the QK norms' sums in another order): a tensor, or a joint block's
    (context, x) where the last block's context is None."""
    import torch
    if isinstance(a, tuple):
        return all((x is None and y is None) or same(x, y, exact) for x, y in zip(a, b))
    if exact:
        return torch.equal(a, b)
    tol = 2e-2 if a.dtype == torch.bfloat16 else 1e-4
    return torch.allclose(a, b, rtol=tol, atol=tol)


def variants(st):
    from comfyui_octet import octet
    from comfyui_octet.octet import lean_blocks
    out = {"bf16 host": st, "bf16 lean": copy.deepcopy(st)}
    assert lean_blocks.install(out["bf16 lean"]) == [""], "the host's code is not the one the lean forward knows"
    for name, switch in (("octet host", "0"), ("octet lean", "1")):
        os.environ["OCTET_LEAN_BLOCKS"] = switch
        m = copy.deepcopy(st)
        octet.quantize_(m, octet.DynamicW8A8Config())
        out[name] = m
    os.environ.pop("OCTET_LEAN_BLOCKS")
    return out


def switch_reads(card: str) -> dict:
    """A per-call switch read (kernels/switches.py) against os.environ.get, side by side, best of 5 x 200k reads:
    an eager SDXL step reads switches ~500 times."""
    import timeit
    from comfyui_octet.kernels import switches
    env = {"os.environ.get": lambda: os.environ.get("OCTET_DEFERRED", "1") != "0",
           "switches.on": lambda: switches.on("OCTET_DEFERRED")}
    ns = {k: min(timeit.repeat(f, number=200_000, repeat=5)) / 200_000 * 1e9 for k, f in env.items()}
    row = {"card": card, "case": "switch read", "ns_os_environ_get": ns["os.environ.get"],
           "ns_switches_on": ns["switches.on"], "ratio": ns["os.environ.get"] / ns["switches.on"]}
    print(f"[{card}] a switch read: os.environ.get {row['ns_os_environ_get']:.0f} ns, switches.on "
          f"{row['ns_switches_on']:.0f} ns ({row['ratio']:.1f}x)", flush=True)
    return row


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
    import comfy.ldm.modules.diffusionmodules.mmdit as mmdit
    from comfyui_octet.kernels import switches
    # The host's choice on CUDA (CPU hosts pick split / sub-quadratic attention); mmdit imported it by name.
    attention.optimized_attention = mmdit.optimized_attention = attention.attention_pytorch
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    if not cuda:
        torch.set_num_threads(1)
    card = torch.cuda.get_device_name() if cuda else "cpu (proxy: tiny widths)"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header = f"card: {card}; torch {torch.__version__}; SDXL / SD3.5-medium blocks as 1024² runs them; {stamp}"
    print(header, flush=True)
    rows = []
    for name, family, width, heads, depth, tokens, context_tokens, per_step in (CASES if cuda else TINY):
        context_dim = (2048 if cuda else 64) if family == "sdxl" else width
        blocks = depth if family == "sdxl" else 1
        call = inputs(family, width, tokens, context_tokens, context_dim, device, dtype)
        models = variants(build(family, width, heads, depth, device, dtype, context_dim))
        calls = {v: (lambda m=m: call(m)) for v, m in models.items()}
        # SD3's lean joint block prepares q/k/v with one kernel per stream where the kernels run (OCTET_DEFERRED); on
        # a GPU a UNet's lean stacks call flash attention's op, not the host's SDPA (OCTET_ATTENTION_OP=sdpa: exact).
        from comfyui_octet.octet import lean_blocks
        if family == "sdxl":
            exact = not cuda or lean_blocks.attention_op("flash") is None
        else:
            exact = not switches.on("OCTET_DEFERRED")
        with torch.inference_mode():
            assert same(calls["bf16 lean"](), calls["bf16 host"](), exact), f"{name}: lean bf16 differs from the host's"
            for v in ("octet host", "octet lean"):
                calls[v]()                            # plans made, kernels tuned
            assert same(calls["octet lean"](), calls["octet host"](), exact), f"{name}: lean INT8 differs"
            host = {v: [] for v in VARIANTS}
            wall = {v: [] for v in VARIANTS}
            for r in range(args.rounds):
                order = VARIANTS[r % 4:] + VARIANTS[:r % 4]
                for v in order:
                    h, w = time_call(calls[v], sync, args.reps)
                    host[v].append(h * 1e6 / blocks)
                    wall[v].append(w * 1e6 / blocks)
        base = {"card": card, "case": name, "width": width, "heads": heads, "tokens": tokens,
                "blocks_per_step": per_step, "rounds": args.rounds, "versions": {"torch": torch.__version__}}
        for kind in ("bf16", "octet"):
            ratios = [a / b for a, b in zip(host[f"{kind} host"], host[f"{kind} lean"])]
            wall_ratios = [a / b for a, b in zip(wall[f"{kind} host"], wall[f"{kind} lean"])]
            saved_ms = (statistics.median(host[f"{kind} host"]) - statistics.median(host[f"{kind} lean"])) \
                * per_step / 1000
            row = dict(base, variant=kind, host_us_per_block=statistics.median(host[f"{kind} host"]),
                       lean_us_per_block=statistics.median(host[f"{kind} lean"]),
                       host_wall_us_per_block=statistics.median(wall[f"{kind} host"]),
                       lean_wall_us_per_block=statistics.median(wall[f"{kind} lean"]),
                       host_over_lean=statistics.median(ratios), wall_host_over_lean=statistics.median(wall_ratios),
                       host_ms_saved_per_step=saved_ms)
            rows.append(row)
            print(f"[{card}] {kind} {name}: host {row['host_us_per_block']:.1f} -> lean {row['lean_us_per_block']:.1f}"
                  f" us/block CPU ({row['host_over_lean']:.2f}x), wall {row['host_wall_us_per_block']:.1f} -> "
                  f"{row['lean_wall_us_per_block']:.1f} us/block ({row['wall_host_over_lean']:.2f}x); {saved_ms:.2f} "
                  f"ms of host time per step ({per_step} blocks)", flush=True)
        # What issue 13's eager target compares: Octet's block (lean) against the stock bf16 block (host forward).
        vs = [a / b for a, b in zip(host["bf16 host"], host["octet lean"])]
        vs_wall = [a / b for a, b in zip(wall["bf16 host"], wall["octet lean"])]
        rows.append(dict(base, variant="octet lean vs bf16 host", host_over_lean=statistics.median(vs),
                         wall_host_over_lean=statistics.median(vs_wall)))
        print(f"[{card}] octet lean vs stock bf16, {name}: host {statistics.median(vs):.2f}x, "
              f"wall {statistics.median(vs_wall):.2f}x (per block, paired by round)", flush=True)
    rows.append(switch_reads(card))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "lean_blocks.json")
    with open(path, "w") as f:
        json.dump({"header": header, "rows": rows}, f, indent=1)
    print(f"[{card}] wrote {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
