"""Benchmark Octet's INT8 kernels against bf16 and the stock INT8 paths, on one GPU.

Run from the repository root:  python3 bench/kernels.py [--out DIR] [--quick]
Prints, per shape, milliseconds and the ratio to bf16 F.linear / F.conv2d (ratio > 1 = faster than
bf16) for: our Triton GEMM with a pre-quantized input (GEMM + fused epilogue), the whole layer
(activation quantization + GEMM), the weight-only W8A16 kernel, eager W8A8 (torch quantize +
torch._int_mm + dequant), the float path (dequantize + F.linear), bitsandbytes (if importable) and
whatever the AUTO dispatcher picks. All baselines run in the same process on the same card.
Timing: triton.testing.do_bench medians (CUDA events) over fresh random data, never zeros.
Writes kernels.json and kernels.md (a table for docs/BENCHMARKS.md) to --out.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import octet_pack  # noqa: E402


def _load_kernels():
    """Import the repo as package comfyui_octet (like ComfyUI does) and return its kernels."""
    octet_pack.load()
    from comfyui_octet import kernels
    return kernels


# (model, layer, tokens at batch 1, N, K): 1024x1024 images.
LINEAR_SHAPES = [
    ("flux-dev", "qkv 3072->9216", 4608, 9216, 3072),
    ("flux-dev", "mlp up 3072->12288", 4608, 12288, 3072),
    ("flux-dev", "mlp down 12288->3072", 4608, 3072, 12288),
    ("flux-dev", "modulation 3072->18432", 1, 18432, 3072),
    ("sd3-medium", "qkv 1536->4608", 4096, 4608, 1536),
    ("sd3-medium", "attn out 1536->1536", 4096, 1536, 1536),
    ("sd3-medium", "ff up 1536->6144", 4096, 6144, 1536),
    ("sd3-medium", "ff down 6144->1536", 4096, 1536, 6144),
    ("sdxl", "attn q/k/v/out 640 @64^2", 4096, 640, 640),
    ("sdxl", "ff geglu 640->5120 @64^2", 4096, 5120, 640),
    ("sdxl", "ff down 2560->640 @64^2", 4096, 640, 2560),
    ("sdxl", "attn q/k/v/out 1280 @32^2", 1024, 1280, 1280),
    ("sdxl", "ff geglu 1280->10240 @32^2", 1024, 10240, 1280),
    ("sdxl", "ff down 5120->1280 @32^2", 1024, 1280, 5120),
    ("sdxl", "cross-attn k/v 2048->1280", 77, 1280, 2048),
    # Wan 2.1 1.3B at 832x480, 33 frames (14,040 tokens, batch 1: bench/e2e.py's shape)
    ("wan2.1-1.3b", "self-attn q/k/v/o 1536->1536", 14040, 1536, 1536),
    ("wan2.1-1.3b", "ffn up 1536->8960", 14040, 8960, 1536),
    ("wan2.1-1.3b", "ffn down 8960->1536", 14040, 1536, 8960),
]
# Transformer MLPs fc1 -> GELU(tanh) -> fc2 (model, block, tokens at batch 1, width, hidden):
# Flux double-block img_mlp at 1024^2, SD3 at 1024^2, Wan 2.1 1.3B at 480x832x81 frames.
MLP_SHAPES = [
    ("flux-dev", "img_mlp 3072->12288->3072", 4096, 3072, 12288),
    ("sd3-medium", "mlp 1536->6144->1536", 4096, 1536, 6144),
    ("wan2.1-1.3b", "ffn 1536->8960->1536", 32760, 1536, 8960),
]
# (model, layer, channels in, channels out, latent side, kernel, stride)
CONV_SHAPES = [
    ("sdxl", "3x3 320 @128^2", 320, 320, 128, 3, 1),
    ("sdxl", "3x3 640 @64^2", 640, 640, 64, 3, 1),
    ("sdxl", "3x3 1280 @32^2", 1280, 1280, 32, 3, 1),
    ("sdxl", "3x3 s2 320 @128^2", 320, 320, 128, 3, 2),
    ("sdxl", "1x1 320->640 @64^2", 320, 640, 64, 1, 1),
]


def bench(fn, reps_ms: int) -> float:
    """Eager: what a Python caller sees, CPU launch overhead included (do_bench, CUDA events)."""
    from triton.testing import do_bench
    return do_bench(fn, warmup=10, rep=reps_ms, return_mode="median")


def bench_graph(fn, reps_ms: int) -> float:
    """GPU time alone: the calls are captured in a CUDA graph and replayed (no launch overhead)."""
    from triton.testing import do_bench_cudagraph
    fn()
    torch.cuda.synchronize()
    return do_bench_cudagraph(fn, rep=reps_ms, return_mode="median")


def time_paths(paths: dict, reps_ms: int) -> dict:
    """Eager and graph (``"graph " + name``) milliseconds of each path, all measured here in one run."""
    t = {name: bench(fn, reps_ms) for name, fn in paths.items()}
    t.update({"graph " + name: bench_graph(fn, reps_ms) for name, fn in paths.items()})
    return t


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def linear_row(kernels, model, layer, m, n, k, reps_ms):
    from comfyui_octet.kernels import registry, torch_ref
    from comfyui_octet.kernels.backends import bnb, triton_gemm, triton_quant
    dev, dt = "cuda", torch.bfloat16
    x = torch.randn(m, k, device=dev, dtype=dt)
    w = torch.randn(n, k, device=dev, dtype=dt) * 0.02
    bias = torch.randn(n, device=dev, dtype=dt)
    qw, ws = torch_ref.quantize_weight(w)
    xq, xs = triton_quant.quantize_rows(x)
    # Correctness on this shape first: integers equal to torch._int_mm's, output close to the reference.
    ref = torch_ref.linear_w8a8(x, qw, ws, bias)
    ours = kernels.linear(x, qw, ws, bias, backend="triton")
    acc_ok = torch.equal(triton_gemm.w8a8_gemm(xq[:64], torch.ones(min(m, 64), device=dev), qw[:256],
                                               torch.ones(min(n, 256), device=dev), None, torch.float32),
                         torch._int_mm(xq[:64].contiguous(), qw[:256].t().contiguous()).float()) if m >= 17 else None
    row = {"model": model, "layer": layer, "M": m, "N": n, "K": k,
           "err_vs_ref": rel_err(ours, ref), "err_vs_bf16": rel_err(ours, F.linear(x, w, bias)), "int_exact": acc_ok}
    t = {}
    t["bf16"] = bench(lambda: F.linear(x, w, bias), reps_ms)
    t["gemm"] = bench(lambda: triton_gemm.w8a8_gemm(xq, xs, qw, ws, bias, dt), reps_ms)
    t["quant+gemm"] = bench(lambda: kernels.linear(x, qw, ws, bias, backend="triton"), reps_ms)
    # Static W8A8: one calibrated scale, so the quantizer skips the per-token absmax reduction.
    static_scale = torch_ref.scale_from_absmax(x.abs().amax()).reshape(1)
    t["static quant+gemm"] = bench(lambda: kernels.linear(x, qw, ws, bias, act="static", static_scale=static_scale,
                                                          backend="triton"), reps_ms)
    t["quant"] = bench(lambda: triton_quant.quantize_rows(x), reps_ms)
    if m <= 1024:
        t["w8a16"] = bench(lambda: kernels.linear(x, qw, ws, bias, act="none", backend="triton"), reps_ms)
    t["int_mm eager"] = bench(lambda: torch_ref.linear_w8a8(x, qw, ws, bias), reps_ms)
    t["float path"] = bench(lambda: kernels.linear(x, qw, ws, bias, backend="float"), reps_ms)
    if bnb.IMPLEMENTATION.unavailable_reason() is None:
        t["bnb"] = bench(lambda: bnb.linear(x, qw, ws, bias, "dynamic", None, None), reps_ms)
    req = registry.Request("linear", "dynamic", "cuda", "bfloat16", m, n, k)
    row["auto_picks"] = registry.select(req).name
    t["auto"] = bench(lambda: kernels.linear(x, qw, ws, bias), reps_ms)
    t["graph bf16"] = bench_graph(lambda: F.linear(x, w, bias), reps_ms)
    t["graph gemm"] = bench_graph(lambda: triton_gemm.w8a8_gemm(xq, xs, qw, ws, bias, dt), reps_ms)
    t["graph quant+gemm"] = bench_graph(lambda: kernels.linear(x, qw, ws, bias, backend="triton"), reps_ms)
    t["graph static quant+gemm"] = bench_graph(lambda: kernels.linear(x, qw, ws, bias, act="static",
                                                                      static_scale=static_scale, backend="triton"),
                                               reps_ms)
    if m <= 1024:
        t["graph w8a16"] = bench_graph(lambda: kernels.linear(x, qw, ws, bias, act="none", backend="triton"),
                                       reps_ms)
    t["graph float path"] = bench_graph(lambda: kernels.linear(x, qw, ws, bias, backend="float"), reps_ms)
    row["ms"] = t
    return row


def conv_row(kernels, model, layer, cin, cout, side, ksize, stride, batch, reps_ms):
    from comfyui_octet.kernels import registry, torch_ref
    from comfyui_octet.kernels.backends import triton_quant
    dev, dt = "cuda", torch.bfloat16
    pad = ksize // 2
    x = torch.randn(batch, cin, side, side, device=dev, dtype=dt)
    w = torch.randn(cout, cin, ksize, ksize, device=dev, dtype=dt) * 0.02
    bias = torch.randn(cout, device=dev, dtype=dt)
    qw, ws = torch_ref.quantize_weight(w)
    ours = kernels.conv2d(x, qw, ws, bias, stride, pad, backend="triton")
    # Reference on a slice (torch_ref's float64 conv is slow on big inputs): same integers.
    ref = torch_ref.conv2d_w8a8(x[:1, :, :32, :32], qw, ws, bias, stride, pad, 1, 1)
    mine = kernels.conv2d(x[:1, :, :32, :32].contiguous(), qw, ws, bias, stride, pad, backend="triton")
    row = {"model": model, "layer": layer, "batch": batch, "C": cin, "OC": cout, "side": side, "k": ksize,
           "stride": stride, "err_vs_ref": rel_err(mine, ref),
           "err_vs_bf16": rel_err(ours, F.conv2d(x, w, bias, stride, pad))}
    t = {}
    t["bf16"] = bench(lambda: F.conv2d(x, w, bias, stride, pad), reps_ms)
    x_cl, w_cl = x.to(memory_format=torch.channels_last), w.to(memory_format=torch.channels_last)
    t["bf16 channels_last"] = bench(lambda: F.conv2d(x_cl, w_cl, bias, stride, pad), reps_ms)
    t["quant+conv"] = bench(lambda: kernels.conv2d(x, qw, ws, bias, stride, pad, backend="triton"), reps_ms)
    t["quant"] = bench(lambda: triton_quant.quantize_per_sample_nhwc(x), reps_ms)
    t["quant+conv channels_last"] = bench(lambda: kernels.conv2d(x_cl, qw, ws, bias, stride, pad, backend="triton"),
                                          reps_ms)
    t["float path"] = bench(lambda: kernels.conv2d(x, qw, ws, bias, stride, pad, backend="float"), reps_ms)
    m = batch * side * side
    row["auto_picks"] = registry.select(registry.Request("conv2d", "dynamic", "cuda", "bfloat16", m, cout,
                                                         cin * ksize * ksize)).name
    t["auto"] = bench(lambda: kernels.conv2d(x, qw, ws, bias, stride, pad), reps_ms)
    t["graph bf16"] = bench_graph(lambda: F.conv2d(x, w, bias, stride, pad), reps_ms)
    t["graph bf16 channels_last"] = bench_graph(lambda: F.conv2d(x_cl, w_cl, bias, stride, pad), reps_ms)
    t["graph quant+conv"] = bench_graph(lambda: kernels.conv2d(x, qw, ws, bias, stride, pad, backend="triton"),
                                        reps_ms)
    t["graph float path"] = bench_graph(lambda: kernels.conv2d(x, qw, ws, bias, stride, pad, backend="float"),
                                        reps_ms)
    row["ms"] = t
    return row


def mlp_row(kernels, model, block, m, width, hidden, reps_ms):
    """The whole MLP three ways: bf16; two INT8 layers with dynamic or static scales and the GELU
    between them in bf16; and the static chain, where fc1's epilogue applies the GELU and writes
    fc2's int8 input (a static scale needs no reduction over the hidden row)."""
    from comfyui_octet.kernels import torch_ref
    dev, dt = "cuda", torch.bfloat16
    x = torch.randn(m, width, device=dev, dtype=dt)
    w1 = torch.randn(hidden, width, device=dev, dtype=dt) * width ** -0.5
    w2 = torch.randn(width, hidden, device=dev, dtype=dt) * hidden ** -0.5
    b1, b2 = (torch.randn(n, device=dev, dtype=dt) * 0.1 for n in (hidden, width))
    (q1, s1), (q2, s2) = torch_ref.quantize_weight(w1), torch_ref.quantize_weight(w2)

    def bf16():
        return F.linear(F.gelu(F.linear(x, w1, b1), approximate="tanh"), w2, b2)

    ref = bf16()
    sc1 = torch_ref.scale_from_absmax(x.float().abs().amax()).reshape(1)
    sc2 = torch_ref.scale_from_absmax(F.gelu(F.linear(x, w1, b1).float(), approximate="tanh").abs().amax()).reshape(1)

    def layers(act):
        kw1 = {"static_scale": sc1} if act == "static" else {}
        kw2 = {"static_scale": sc2} if act == "static" else {}
        h = kernels.linear(x, q1, s1, b1, act=act, backend="triton", **kw1)
        return kernels.linear(F.gelu(h, approximate="tanh"), q2, s2, b2, act=act, backend="triton", **kw2)

    def chain():
        return kernels.static_mlp(x, (q1, s1, b1, None, sc1), (q2, s2, b2, None, sc2), backend="triton")

    paths = {"dynamic layers": lambda: layers("dynamic"), "static layers": lambda: layers("static"),
             "static chain": chain}
    row = {"model": model, "block": block, "M": m, "width": width, "hidden": hidden,
           "err_vs_bf16": {name: rel_err(fn(), ref) for name, fn in paths.items()}}
    row["ms"] = time_paths({"bf16": bf16, **paths}, reps_ms)
    return row


# Fused kernels (issue 13 items 2-3): (model, layer, N, K) at M=16 (memory-bound: batch-1 modulation,
# text tokens) and M=4096 (1024^2 image tokens: compute-bound).
FUSED_SHAPES = [
    ("flux-dev", "attn 3072->3072", 3072, 3072),
    ("flux-dev", "mlp up 3072->12288", 12288, 3072),
    ("flux-dev", "mlp down 12288->3072", 3072, 12288),
    ("sdxl", "attn 640->640", 640, 640),
    ("sdxl", "attn 1280->1280", 1280, 1280),
    ("sdxl", "ff down 5120->1280", 1280, 5120),
]
FUSED_M = [16, 4096]
FUSED_DEVICE = "cuda"  # a CPU dry run of the bench code (TRITON_INTERPRET=1) sets "cpu"
# Flux single block linear2: input cat(attn 3072, GELU(mlp 12288)) -> 3072.
FLUX_SINGLE = (3072, 12288, 3072)
# Weight-only crossover sweep: where the fused W8A16 kernel stops keeping up with bf16 cuBLAS.
CROSSOVER_SHAPES = [("flux-dev", 12288, 3072), ("flux-dev", 3072, 3072), ("sdxl", 1280, 1280)]
CROSSOVER_M = [16, 64, 128, 256, 512, 1024, 2048, 4096]


def fused_row(model, layer, m, n, k, reps_ms, parts=frozenset({"static"})):
    """bf16 cuBLAS vs the weight-only paths (fused kernel, float path, dequantize + cuBLAS) and the old and
    new static-W8A8 paths, eager and CUDA-graph."""
    from comfyui_octet.kernels import torch_ref
    from comfyui_octet.kernels.backends import triton_gemm, triton_quant, triton_w8a16, triton_w8a8_static
    dev, dt = FUSED_DEVICE, torch.bfloat16
    x = torch.randn(m, k, device=dev, dtype=dt)
    w = torch.randn(n, k, device=dev, dtype=dt) * k ** -0.5
    bias = torch.randn(n, device=dev, dtype=dt) * 0.1
    qw, ws = torch_ref.quantize_weight(w)
    smooth = torch.rand(k, device=dev) + 0.5
    sc = (torch_ref.scale_from_absmax(torch_ref.smoothed(x, smooth, -1).abs().amax()) * 0.8).reshape(1)
    mult = triton_w8a8_static.prologue_multiplier(smooth, sc, dev)

    def static_old():
        xq, xs = triton_quant.quantize_rows(x, smooth, sc)
        return triton_gemm.w8a8_gemm(xq, xs, qw, ws, bias, dt)

    paths = {
        "bf16": lambda: F.linear(x, w, bias),
        "w8a16 float path": lambda: F.linear(x, torch_ref.dequantize_weight(qw, ws, dt), bias),
        "w8a16 new": lambda: triton_w8a16.w8a16_gemm(x, qw, ws, bias),
        "w8a16 dequant+cuBLAS": lambda: F.linear(x, triton_w8a16.dequantize_weight(qw, ws, dt), bias),
        "static old": static_old,
        "static fused exact": lambda: triton_w8a8_static.w8a8_static_gemm(x, qw, ws, bias, smooth, sc, exact=True),
        "static fused fast": lambda: triton_w8a8_static.w8a8_static_gemm(x, qw, ws, bias, smooth, sc, exact=False,
                                                                         multiplier=mult),
    }
    if not parts & {"static"}:
        paths = {k_: v for k_, v in paths.items() if not k_.startswith("static")}
    ref16 = torch_ref.linear_w8a16(x.float(), qw, ws, bias.float())
    ref8 = torch_ref.linear_w8a8(x, qw, ws, bias, smooth, sc)
    row = {"model": model, "layer": layer, "M": m, "N": n, "K": k,
           "w8a16_new_err_vs_ref": rel_err(paths["w8a16 new"](), ref16),
           "dequant_equals_ref": bool(torch.equal(triton_w8a16.dequantize_weight(qw, ws, dt),
                                                  torch_ref.dequantize_weight(qw, ws, dt)))}
    if "static" in parts:
        row.update({
           "static_exact_maxdiff_vs_ref": float((paths["static fused exact"]().float() - ref8.float()).abs().max()),
           "static_old_maxdiff_vs_ref": float((static_old().float() - ref8.float()).abs().max()),
           "static_exact_err_vs_ref": rel_err(paths["static fused exact"](), ref8),
           "static_fast_err_vs_ref": rel_err(paths["static fused fast"](), ref8)})
    row["ms"] = time_paths(paths, reps_ms)
    return row


def flux_single_row(m, reps_ms):
    """linear2 of a Flux single block, input cat(attn, GELU(mlp)) with mlp a slice of linear1's output:
    bf16; old INT8 (cat + GELU in bf16 + quantize_rows + GEMM); new (one quantization kernel reading
    both halves, GELU in fp32 + GEMM)."""
    from comfyui_octet.kernels import torch_ref
    from comfyui_octet.kernels.backends import triton_gemm, triton_quant
    k1, k2, n = FLUX_SINGLE
    dev, dt = FUSED_DEVICE, torch.bfloat16
    lin1 = torch.randn(m, 3 * k1 + k2, device=dev, dtype=dt)
    attn, mlp = torch.randn(m, k1, device=dev, dtype=dt), lin1[:, 3 * k1:]
    w = torch.randn(n, k1 + k2, device=dev, dtype=dt) * (k1 + k2) ** -0.5
    bias = torch.randn(n, device=dev, dtype=dt) * 0.1
    qw, ws = torch_ref.quantize_weight(w)

    def cat_bf16():
        return torch.cat((attn, F.gelu(mlp, approximate="tanh")), 1)

    def quant_old():
        return triton_quant.quantize_rows(cat_bf16())

    def quant_new():
        return triton_quant.quantize_rows_cat_gelu(attn, mlp)

    paths = {
        "bf16": lambda: F.linear(cat_bf16(), w, bias),
        "quant old": quant_old, "quant fused": quant_new,
        "layer old": lambda: triton_gemm.w8a8_gemm(*quant_old(), qw, ws, bias, dt),
        "layer fused": lambda: triton_gemm.w8a8_gemm(*quant_new(), qw, ws, bias, dt),
    }
    q_new, s_new = quant_new()
    q_ref, s_ref = torch_ref.cat_gelu_quantize_rows(attn, mlp)
    diff = (q_new.int() - q_ref.int()).abs()
    row = {"model": "flux-dev", "layer": "single linear2 cat(3072, GELU 12288)->3072", "M": m,
           "codes_max_diff": int(diff.max()), "codes_frac_diff": float((diff > 0).float().mean()),
           "err_vs_bf16_layer_old": rel_err(paths["layer old"](), paths["bf16"]()),
           "err_vs_bf16_layer_fused": rel_err(paths["layer fused"](), paths["bf16"]())}
    row["ms"] = time_paths(paths, reps_ms)
    return row


def crossover_rows(reps_ms):
    """Graph timing, bf16 cuBLAS vs the new W8A16 kernel over M: the crossover M per shape."""
    from comfyui_octet.kernels import torch_ref
    from comfyui_octet.kernels.backends import triton_w8a16
    out = []
    for model, n, k in CROSSOVER_SHAPES:
        w = torch.randn(n, k, device=FUSED_DEVICE, dtype=torch.bfloat16) * k ** -0.5
        qw, ws = torch_ref.quantize_weight(w)
        for m in CROSSOVER_M:
            x = torch.randn(m, k, device=FUSED_DEVICE, dtype=torch.bfloat16)
            b = bench_graph(lambda: F.linear(x, w), reps_ms)
            q = bench_graph(lambda: triton_w8a16.w8a16_gemm(x, qw, ws, None), reps_ms)
            d = bench_graph(lambda: F.linear(x, triton_w8a16.dequantize_weight(qw, ws, torch.bfloat16)), reps_ms)
            row = {"model": model, "M": m, "N": n, "K": k, "graph bf16": b, "graph w8a16 new": q,
                   "graph dequant+cuBLAS": d, "ratio": b / q, "ratio_dequant_cublas": b / d, "bf16_TFLOPs": 2 * m * n * k / b / 1e9, "w8a16_TFLOPs": 2 * m * n * k / q / 1e9}
            out.append(row)
            print(torch.cuda.get_device_name(), "crossover", json.dumps(row), flush=True)
    return out


def fused_main(args, header):
    import time
    from comfyui_octet.kernels.backends import triton_w8a16, triton_w8a8_static
    card, t0 = header["card"], time.time()
    res = {"header": header, "fused": [], "flux_single": [], "crossover": []}
    out_json = os.path.join(args.out, "kernels_fused.json")
    os.makedirs(args.out, exist_ok=True)

    def save():
        res["tuned"] = {"w8a16": triton_w8a16.tuned_configs(), "static": triton_w8a8_static.tuned_configs()}
        with open(out_json, "w") as f:
            json.dump(res, f, indent=1)

    parts = set(args.fused_parts.split(","))
    for m in FUSED_M:
        for model, layer, n, k in FUSED_SHAPES if parts & {"w8a16", "static"} else []:
            row = fused_row(model, layer, m, n, k, args.reps_ms, parts)
            res["fused"].append(row)
            print(card, json.dumps(row), f"t={time.time() - t0:.0f}s", flush=True)
            save()
        if "single" in parts:
            row = flux_single_row(m, args.reps_ms)
            res["flux_single"].append(row)
            print(card, json.dumps(row), f"t={time.time() - t0:.0f}s", flush=True)
            save()
    res["crossover"] = crossover_rows(args.reps_ms) if "crossover" in parts else []
    save()
    cols = ["w8a16 float path", "w8a16 new", "w8a16 dequant+cuBLAS", "static old", "static fused exact", "static fused fast"]
    lines = [f"Card: **{card}**, torch {header['torch']}, triton {header['triton']}, {header['date']}.", "",
             "ms (ratio vs bf16 cuBLAS in the same mode, >1 = faster); eager then CUDA graph:", "",
             "| model | layer | M | bf16 ms | " + " | ".join(cols) + " | graph bf16 ms | "
             + " | ".join("graph " + c for c in cols) + " | max abs diff vs torch_ref: static exact / old |",
             "|" + "---|" * (2 * len(cols) + 6)]
    for r in res["fused"]:
        lines.append(f"| {r['model']} | {r['layer']} | {r['M']} | {r['ms']['bf16']:.4f} | "
                     + " | ".join(_fmt(r, cols)) + f" | {r['ms']['graph bf16']:.4f} | "
                     + " | ".join(_fmt(r, ["graph " + c for c in cols])) + f" | {r.get('static_exact_maxdiff_vs_ref', float('nan')):.2g} / "
                     f"{r.get('static_old_maxdiff_vs_ref', float('nan')):.2g} |")
    scols = ["quant old", "quant fused", "layer old", "layer fused"]
    lines += ["", "Flux single-block linear2 (input cat(attn, GELU(mlp))):", "",
              "| M | bf16 ms | " + " | ".join(scols) + " | " + " | ".join("graph " + c for c in scols)
              + " | codes off by 1 |", "|" + "---|" * (2 * len(scols) + 3)]
    for r in res["flux_single"]:
        lines.append(f"| {r['M']} | {r['ms']['bf16']:.4f} | " + " | ".join(_fmt(r, scols)) + " | "
                     + " | ".join(_fmt(r, ["graph " + c for c in scols])) + f" | {r['codes_frac_diff']:.2e} |")
    lines += ["", "W8A16 crossover (graph): ratio vs bf16 per M, fused kernel / one-pass dequantize + cuBLAS", "",
              "| model | N | K | " + " | ".join(f"M={m}" for m in CROSSOVER_M) + " |",
              "|" + "---|" * (3 + len(CROSSOVER_M))]
    for model, n, k in CROSSOVER_SHAPES:
        rs = [r for r in res["crossover"] if (r["N"], r["K"]) == (n, k)]
        lines.append(f"| {model} | {n} | {k} | " + " | ".join(
            f"{r['ratio']:.2f}x / {r['ratio_dequant_cublas']:.2f}x" for r in rs) + " |")
    table = "\n".join(lines)
    with open(os.path.join(args.out, "kernels_fused.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    print("tuned", json.dumps(res["tuned"]))


def _fmt(row, cols):
    cells = []
    for c in cols:
        base = row["ms"]["graph bf16" if c.startswith("graph") else "bf16"]
        v = row["ms"].get(c)
        cells.append("n/a" if v is None else f"{v:.3f} ({base / v:.2f}x)")
    return cells


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--quick", action="store_true", help="batch 1 only, shorter timing")
    ap.add_argument("--reps-ms", type=int, default=60)
    ap.add_argument("--fused-parts", default="w8a16,static,single,crossover",
                    help="with --sections fused: which of w8a16, static, single, crossover to run")
    ap.add_argument("--models", nargs="+", default=None, help="only the linear/mlp rows of these models")
    ap.add_argument("--sections", default="linear,quant,conv,mlp",
                    help="comma list of linear, quant, conv, mlp (or fused alone: the issue-13 fused kernels); a subset writes kernels_<sections>.json/md")
    args = ap.parse_args()
    sections = set(args.sections.split(","))
    suffix = "" if sections >= {"linear", "quant", "conv", "mlp"} else "_" + "_".join(sorted(sections))
    kernels = _load_kernels()
    import triton
    from comfyui_octet.kernels.backends import bnb
    card = torch.cuda.get_device_name()
    header = {"card": card, "capability": torch.cuda.get_device_capability(), "torch": torch.__version__,
              "triton": triton.__version__, "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "bitsandbytes": bnb.IMPLEMENTATION.unavailable_reason() or "available"}
    print(json.dumps(header), flush=True)
    if sections == {"fused"}:
        return fused_main(args, header)
    batches = [1] if args.quick else [1, 4]
    rows = []
    for batch in batches if "linear" in sections else []:
        for model, layer, m, n, k in LINEAR_SHAPES:
            if args.models and model not in args.models:
                continue
            m_b = m * batch if m > 1 or batch == 1 else batch
            if layer.startswith("cross"):
                m_b = 77 * batch
            row = linear_row(kernels, model, layer, m_b, n, k, args.reps_ms)
            row["batch"] = batch
            rows.append(row)
            print(card, json.dumps(row), flush=True)
    quant_rows = _quant_variants(args.reps_ms) if "quant" in sections else []
    conv_rows = []
    for batch in batches if "conv" in sections else []:
        for shape in CONV_SHAPES:
            row = conv_row(kernels, *shape, batch, args.reps_ms)
            conv_rows.append(row)
            print(card, json.dumps(row), flush=True)
    mlp_rows = []
    for batch in batches if "mlp" in sections else []:
        for model, block, m, width, hidden in MLP_SHAPES:
            if batch > 1 and m * batch * hidden > 2**31 // 2:
                continue  # Wan at batch 4 would need 2.3 GB per hidden tensor: batch 1 says enough
            row = mlp_row(kernels, model, block, m * batch, width, hidden, args.reps_ms)
            row["batch"] = batch
            mlp_rows.append(row)
            print(card, json.dumps(row), flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"kernels{suffix}.json"), "w") as f:
        json.dump({"header": header, "linear": rows, "conv": conv_rows, "quant_variants": quant_rows,
                   "mlp": mlp_rows}, f, indent=1)
    lin_cols = ["gemm", "quant+gemm", "static quant+gemm", "w8a16", "int_mm eager", "float path", "bnb", "auto",
                "graph bf16", "graph gemm", "graph quant+gemm", "graph static quant+gemm", "graph w8a16",
                "graph float path"]
    conv_cols = ["bf16 channels_last", "quant+conv", "quant+conv channels_last", "float path", "auto",
                 "graph bf16", "graph bf16 channels_last", "graph quant+conv", "graph float path"]
    lines = [f"Card: **{card}** (sm{header['capability'][0]}{header['capability'][1]}), torch {header['torch']}, "
             f"triton {header['triton']}, {header['date']}. bitsandbytes: {header['bitsandbytes']}.", "",
             "Linear, bf16 activations; ms (ratio vs bf16 F.linear, >1 = faster):", "",
             "| model | layer | batch | M | bf16 ms | " + " | ".join(lin_cols) + " | AUTO picks | rel.err vs bf16 |",
             "|" + "---|" * (len(lin_cols) + 7)]
    for r in rows:
        lines.append(f"| {r['model']} | {r['layer']} | {r['batch']} | {r['M']} | {r['ms']['bf16']:.3f} | "
                     + " | ".join(_fmt(r, lin_cols)) + f" | {r['auto_picks']} | {r['err_vs_bf16']:.4f} |")
    lines += ["", "Conv2d, bf16 NCHW activations; ms (ratio vs cuDNN bf16 NCHW):", "",
              "| model | layer | batch | bf16 ms | " + " | ".join(conv_cols) + " | AUTO picks | rel.err vs bf16 |",
              "|" + "---|" * (len(conv_cols) + 6)]
    for r in conv_rows:
        lines.append(f"| {r['model']} | {r['layer']} | {r['batch']} | {r['ms']['bf16']:.3f} | "
                     + " | ".join(_fmt(r, conv_cols)) + f" | {r['auto_picks']} | {r['err_vs_bf16']:.4f} |")
    mlp_cols = ["dynamic layers", "static layers", "static chain",
                "graph bf16", "graph dynamic layers", "graph static layers", "graph static chain"]
    lines += ["", "Transformer MLP fc1 -> GELU(tanh) -> fc2, bf16 activations; ms (ratio vs the bf16 MLP). "
              "'layers': two INT8 linears (own activation quantization each) with the GELU between them in "
              "bf16; 'static chain': fc1's epilogue applies the GELU and quantizes for fc2 (int8 hidden):", "",
              "| model | block | batch | M | bf16 ms | " + " | ".join(mlp_cols) + " | rel.err dynamic / static / chain |",
              "|" + "---|" * (len(mlp_cols) + 6)]
    for r in mlp_rows:
        e = r["err_vs_bf16"]
        lines.append(f"| {r['model']} | {r['block']} | {r['batch']} | {r['M']} | {r['ms']['bf16']:.3f} | "
                     + " | ".join(_fmt(r, mlp_cols)) + f" | {e['dynamic layers']:.4f} / {e['static layers']:.4f} / "
                     f"{e['static chain']:.4f} |")
    lines += ["", "Columns without 'graph': eager calls timed with CUDA events (CPU launch overhead included),"
              " ratio vs eager bf16. 'graph' columns: the same calls captured in a CUDA graph (GPU time only),"
              " ratio vs graph bf16."]
    table = "\n".join(lines)
    with open(os.path.join(args.out, f"kernels{suffix}.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    _print_tuned_configs()


def _quant_variants(reps_ms):
    """Row quantization launch shapes compared on the GPU (GPU time; bytes moved / time = GB/s)."""
    from comfyui_octet.kernels.backends import triton_quant
    default = triton_quant.row_launch_config
    variants = {"default": default,
                "loop1024w4": lambda k: (False, 1024, 4), "loop2048w8": lambda k: (False, 2048, 8),
                "loop4096w8": lambda k: (False, 4096, 8), "tile_w4": lambda k: (True, triton.next_power_of_2(k), 4),
                "tile_w8": lambda k: (True, triton.next_power_of_2(k), 8)}
    import triton
    out = []
    for m, k in [(4608, 3072), (4608, 12288), (16384, 2560), (16384, 6144)]:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        ref = triton_quant.quantize_rows(x)[0]
        for name, fn in variants.items():
            triton_quant.row_launch_config = fn
            try:
                assert torch.equal(triton_quant.quantize_rows(x)[0], ref)
                ms = bench_graph(lambda: triton_quant.quantize_rows(x), reps_ms)
                row = {"M": m, "K": k, "variant": name, "ms": ms, "GBps": 3 * m * k / ms / 1e6}
            except Exception as exc:  # a variant that does not compile is a result too
                row = {"M": m, "K": k, "variant": name, "error": repr(exc)[:200]}
            finally:
                triton_quant.row_launch_config = default
            out.append(row)
            print(torch.cuda.get_device_name(), "quant", json.dumps(row), flush=True)
    return out


def _print_tuned_configs():
    """Which tile each autotuned kernel chose per key (M bucket, N, K, ...): evidence for the configs."""
    from comfyui_octet.kernels.backends import triton_conv, triton_gemm, triton_w8a16
    for name, kern in (("w8a8", triton_gemm._w8a8_kernel), ("w8a16", triton_w8a16._tuned_kernel),
                       ("conv", triton_conv._conv_kernel)):
        for key, cfg in kern.cache.items():
            print("tuned", name, key[:6], cfg.kwargs, f"warps={cfg.num_warps} stages={cfg.num_stages}")


if __name__ == "__main__":
    main()
