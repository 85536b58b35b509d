"""INT8 q·kᵀ attention (kernels/backends/triton_attention.py, the INT8 Attention node) against the host's
attention (PyTorch SDPA on the [B, H, S, D] views, as ComfyUI's attention_pytorch calls it) at the models' shapes,
GPU time per call as CUDA-graph replays (no host cost) and eager (host cost included), one process; and its
accuracy against fp32 attention (cosine and relative error; bf16 SDPA's beside it).

    python bench/attention_int8.py [--out DIR] [--sweep]

``--sweep`` times each of the kernel's tile configs alone at the head_dim-128 shapes (Flux, Wan): which one the
autotuner should find."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(os.path.dirname(ROOT), "scripts"))
import octet_pack  # noqa: E402

# (label, batch, query tokens, key tokens, heads, head_dim): 1024² images, Wan 2.1 1.3B at 9 latent frames of 60x104
SHAPES = (("flux-dev joint (4096 + 512)", 1, 4608, 4608, 24, 128),
          ("wan2.1-1.3b self (14040)", 1, 14040, 14040, 12, 128),
          ("wan2.1-1.3b cross (14040 x 512)", 1, 14040, 512, 12, 128),
          ("sd3.5-medium joint (4096 + 154)", 1, 4250, 4250, 24, 64),
          ("sdxl 64x64 self (4096, 10 heads)", 2, 4096, 4096, 10, 64),
          ("sdxl 32x32 self (1024, 20 heads)", 2, 1024, 1024, 20, 64),
          ("sdxl 64x64 cross (4096 x 77)", 2, 4096, 77, 10, 64))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(ROOT), "out", "bench"))
    parser.add_argument("--sweep", action="store_true")
    args = parser.parse_args()
    import torch
    import torch.nn.functional as F
    octet_pack.load(comfy=False, cpu=not torch.cuda.is_available())
    if not torch.cuda.is_available():
        print("attention_int8: needs a CUDA device")
        return 2
    from comfyui_octet.kernels.backends import triton_attention
    from kernels import bench, bench_graph
    card = torch.cuda.get_device_name()
    dev = torch.device("cuda")
    rows = []
    g = torch.Generator(device=dev).manual_seed(0)
    for label, b, sq, sk, h, d in SHAPES:
        q = torch.randn(b, sq, h * d, device=dev, generator=g, dtype=torch.bfloat16).unflatten(-1, (h, d))
        # keys with a per-channel offset, as DiT keys have (what smooth_k removes)
        k = (torch.randn(b, sk, h * d, device=dev, generator=g) + 3 * torch.randn(1, 1, h * d, device=dev,
             generator=g)).to(torch.bfloat16).unflatten(-1, (h, d))
        v = torch.randn(b, sk, h * d, device=dev, generator=g, dtype=torch.bfloat16).unflatten(-1, (h, d))

        def sdpa():
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))

        def int8():
            return triton_attention.attention(q, k, v)

        def int8_plain():
            return triton_attention.attention(q, k, v, smooth_k=False)

        # q and k quantized once beforehand, as the kernel-alone timings and the tile sweep read them
        codes = triton_attention._quantize_qk(q, k, torch.mean(k, dim=1, dtype=torch.float32).contiguous(),
                                              d ** -0.5 * triton_attention.LOG2E)
        kernel_only, bf16_kernel = kernel_runs(triton_attention, q, k, v, codes)

        exact = F.scaled_dot_product_attention(q.float().transpose(1, 2), k.float().transpose(1, 2),
                                               v.float().transpose(1, 2)).transpose(1, 2)

        def accuracy(out):
            a, e = out.float().flatten(), exact.flatten()
            return {"cosine": float(F.cosine_similarity(a, e, dim=0)), "rel_err": float((a - e).norm() / e.norm())}
        row = {"shape": label, "b": b, "sq": sq, "sk": sk, "heads": h, "head_dim": d, "card": card,
               "sdpa_acc": accuracy(sdpa().transpose(1, 2)), "int8_acc": accuracy(int8()),
               "int8_plain_acc": accuracy(int8_plain())}
        for name, fn in (("sdpa", sdpa), ("int8", int8), ("int8_plain", int8_plain)):
            row[f"{name}_graph_us"] = bench_graph(fn, 200) * 1000
            row[f"{name}_eager_us"] = bench(fn, 200) * 1000
        # the kernel alone on int8 codes made beforehand, and the same kernel with q·kᵀ in bf16: how much of the
        # difference to SDPA is the int8 product and how much the rest of this Triton kernel
        row["int8_kernel_graph_us"] = bench_graph(kernel_only, 200) * 1000
        row["bf16_kernel_graph_us"] = bench_graph(bf16_kernel, 200) * 1000
        row["speedup_graph"] = row["sdpa_graph_us"] / row["int8_graph_us"]
        row["speedup_eager"] = row["sdpa_eager_us"] / row["int8_eager_us"]
        flops = 4 * b * h * sq * sk * d
        row["int8_tflops"] = flops / row["int8_graph_us"] / 1e6
        row["sdpa_tflops"] = flops / row["sdpa_graph_us"] / 1e6
        print(f"[{card}] {label}: SDPA {row['sdpa_graph_us']:.0f} us ({row['sdpa_tflops']:.0f} TFLOP/s), INT8 "
              f"{row['int8_graph_us']:.0f} us ({row['int8_tflops']:.0f}; kernel alone {row['int8_kernel_graph_us']:.0f}"
              f", with bf16 q·kᵀ {row['bf16_kernel_graph_us']:.0f}), {row['speedup_graph']:.2f}x graph, "
              f"{row['speedup_eager']:.2f}x eager; cosine vs fp32 SDPA {row['sdpa_acc']['cosine']:.6f}, INT8 "
              f"{row['int8_acc']['cosine']:.6f} (no smoothing {row['int8_plain_acc']['cosine']:.6f})", flush=True)
        if args.sweep and d == 128:     # the DiT shapes (Flux, Wan): the tile choice that matters most
            row["sweep"] = sweep(triton_attention, q, v, codes, card, label)
        rows.append(row)
        # written after every shape: a device call cut off by its time limit keeps the rows it finished
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, "attention_int8.json")
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        with open(path, "w") as f:
            json.dump({"header": f"card: {card}; torch {torch.__version__}; {stamp}", "rows": rows}, f, indent=1)
    print(f"[{card}] wrote {path}")
    return 0


def kernel_runs(triton_attention, q, k, v, codes):
    """Two calls of the attention kernel through its autotuner: on the int8 ``codes`` (``_quantize_qk``'s) of q and
    k, and on bf16 q and k in the codes' layout (QK_INT8=False: the scores in bf16, scaled by sm_scale·log2 e only)."""
    import torch
    b, sq, h, d = q.shape
    sk = k.shape[1]
    qb, kb = (t.transpose(1, 2).contiguous() for t in (q, k))       # [B, H, S, D]: the codes' layout (D = BLOCK_D)
    qbs = torch.full((b, h, sq), d ** -0.5 * triton_attention.LOG2E, device=q.device)
    kbs = torch.ones((b, h, sk), device=q.device)
    out = torch.empty_like(q)
    kernel = triton_attention._attention_kernel

    def grid(meta):
        return (triton_attention.triton_support.cdiv(sq, meta["BLOCK_M"]), b * h)

    def run(a, a_s, c, c_s, int8):
        kernel[grid](*triton_attention.kernel_args(a, a_s, c, c_s, v, out), **triton_attention.kernel_flags(d, int8))
    return (lambda: run(*codes, True)), (lambda: run(qb, qbs, kb, kbs, False))


def sweep(triton_attention, q, v, codes, card, label) -> dict:
    """Each tile config of the attention kernel alone on the int8 ``codes`` (the quantizers' time is the same for
    all)."""
    import torch
    from kernels import bench_graph
    kernel = triton_attention._attention_kernel
    out = {}
    b, sq, h, d = q.shape
    args = triton_attention.kernel_args(*codes, v, torch.empty_like(q))
    flags = triton_attention.kernel_flags(d)
    for c in kernel.configs:
        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]

        def run():
            kernel.fn[(triton_attention.triton_support.cdiv(sq, bm), b * h)](
                *args, **flags, BLOCK_M=bm, BLOCK_N=bn, num_warps=c.num_warps, num_stages=c.num_stages)
        name = f"{bm}x{bn} w{c.num_warps} s{c.num_stages}"
        try:
            out[name] = bench_graph(run, 100) * 1000
        except Exception as e:     # a tile that does not fit this card's shared memory
            out[name] = f"{type(e).__name__}: {str(e)[:80]}"
        print(f"[{card}]   {label} {name}: {out[name] if isinstance(out[name], str) else f'{out[name]:.0f} us'}",
              flush=True)
    return out


if __name__ == "__main__":
    sys.exit(main())
