"""GPU time of the deferred-input quantizers at Flux-dev's 1024² shapes (4608 tokens), each against the
float passes it replaces, timed as CUDA-graph replays (no host cost; bench/kernels.py's timer), one
process; and Flux's q/k preparation (QK RMSNorm + RoPE, the double block's cat) as the host's ops vs the
one kernel (kernels/backends/triton_rope.py); and SDXL's GroupNorm (+ SiLU) and GEGLU gate at 1024² as the
host's ops vs the kernels (kernels/backends/triton_groupnorm.py, triton_geglu.py; octet/float_fusions.py); and
Wan 2.1 1.3B's q/k preparation (RMSNorm over the row + RoPE) as the host's ops vs triton_rope.row_norm_rope; and
SD3.5-medium's attention inputs (split_qkv, QK norms, the streams' cats) vs triton_rope.QKVHeads; and an MLP's
fc1 with the GELU in its GEMM epilogue vs the GEMM and a GELU pass (Wan, Flux, SD3.5 shapes; octet/fusion.py).
``--sweep`` also sweeps the GELU quantizer's (tile, warps) for the single block's 15360-wide rows, the q/k
kernel's, the GroupNorm's and the GEGLU's tiles. Prints a table and writes JSON.

    python bench/deferred_kernels.py [--out DIR] [--only unet]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import octet_pack  # noqa: E402


def graph_us(fn) -> float:
    """GPU time per call in µs through bench/kernels.py's CUDA-graph timer (triton's do_bench_cudagraph)."""
    from kernels import bench_graph
    return bench_graph(fn, 100) * 1000


def qk_rows(add, timer, dev, sweep=False):
    """Flux's q/k preparation per attention, 24 heads of 128: the host's ops (QKNorm's two RMSNorms over the
    qkv views, 0.3.75's fp32 apply_rope; the double block's cats of the text and image streams first) vs
    triton_rope.qk_norm_rope."""
    import torch
    import torch.nn.functional as F
    from comfyui_octet.kernels import torch_ref
    from comfyui_octet.kernels.backends import triton_rope
    heads, hd = 24, 128

    def views(length):
        qkv = torch.randn(1, length, 3 * heads * hd, device=dev, dtype=torch.bfloat16)
        return qkv.view(1, length, 3, heads, hd).permute(2, 0, 3, 1, 4)

    def rope1(x, freqs):   # comfy.ldm.flux.math.apply_rope1 (0.3.75)
        x_ = x.to(dtype=freqs.dtype).reshape(*x.shape[:-1], -1, 1, 2)
        out = freqs[..., 0] * x_[..., 0]
        out.addcmul_(freqs[..., 1], x_[..., 1])
        return out.reshape(*x.shape).type_as(x)

    w = [torch.randn(hd, device=dev, dtype=torch.bfloat16) for _ in range(4)]
    for label, lengths in (("single block (4608 tokens)", (4608,)), ("double block (512 + 4096, cat)", (512, 4096))):
        total = sum(lengths)
        freqs = torch.randn(1, 1, total, hd // 2, 2, 2, device=dev)
        parts = [views(n) for n in lengths]

        def host():
            qs = [F.rms_norm(q, (hd,), w[2 * i], 1e-6) for i, (q, _, _) in enumerate(parts)]
            ks = [F.rms_norm(k, (hd,), w[2 * i + 1], 1e-6) for i, (_, k, _) in enumerate(parts)]
            q = qs[0] if len(qs) == 1 else torch.cat(qs, dim=2)
            k = ks[0] if len(ks) == 1 else torch.cat(ks, dim=2)
            return rope1(q, freqs), rope1(k, freqs)

        segments = [(q, k, w[2 * i], w[2 * i + 1], 1e-6, 1e-6) for i, (q, k, _) in enumerate(parts)]
        fused_q, _ = triton_rope.qk_norm_rope(segments, freqs, torch.bfloat16)
        ref_q = torch.cat([torch_ref.qk_norm_rope(q, w[2 * i], 1e-6, freqs, sum(lengths[:i]))
                           for i, (q, _, _) in enumerate(parts)], dim=2)
        bad = ((fused_q.float() - ref_q.float()).abs() > 1e-2 * ref_q.float().abs().clamp_min(1)).float().mean().item()
        add(f"q/k prep, {label}: host ops", timer(host))
        moved = 2 * 2 * total * heads * hd * 2 + total * hd * 2 * 4
        add(f"q/k prep, {label}: qk_norm_rope {triton_rope.CONFIG} (values off by >1%: {bad:.1e})",
            timer(lambda: triton_rope.qk_norm_rope(segments, freqs, torch.bfloat16)), moved)
        configs = [(16, 1, 4), (32, 1, 4), (32, 4, 4), (16, 8, 4), (64, 8, 4), (64, 8, 8), (32, 24, 4), (64, 4, 8),
                   (128, 4, 8)]
        for config in configs if sweep else ():
            add(f"  qk_norm_rope (BLOCK_L, HEADS, warps)={config}",
                timer(lambda c=config: triton_rope.qk_norm_rope(segments, freqs, torch.bfloat16, c)), moved)


def sd3_rows(add, timer, dev):
    """SD3.5-medium's q (or k) per joint attention, 24 heads of 64: the host's ops (ln_q on the context's 333
    and the image's 4096 token rows of the qkv views, reshape, MMDiT's cat) vs triton_rope.rms_norm_heads."""
    import torch
    import torch.nn.functional as F
    from comfyui_octet.kernels.backends import triton_rope
    heads, hd = 24, 64
    parts = []
    for length in (333, 4096):
        qkv = torch.randn(1, length, 3 * heads * hd, device=dev, dtype=torch.bfloat16)
        parts.append((qkv.reshape(1, length, 3, heads, hd).movedim(2, 0)[0],
                      torch.randn(hd, device=dev, dtype=torch.bfloat16), 1e-6))

    def host():
        return torch.cat([F.rms_norm(x, (hd,), w, eps).reshape(1, x.shape[1], -1) for x, w, eps in parts], dim=1)

    moved = 2 * 2 * (333 + 4096) * heads * hd
    add("SD3 q (333 + 4096 tokens): ln_q x2 + cat (host ops)", timer(host))
    add("SD3 q (333 + 4096 tokens): rms_norm_heads", timer(lambda: triton_rope.rms_norm_heads(parts, torch.bfloat16)),
        moved)


def host_us(fn, calls: int = 200) -> float:
    """Host time per call in µs (the thread's CPU time to issue it), after warm-up calls; the GPU is synchronized
    only after the timed calls."""
    import time
    import torch
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t0 = time.thread_time()
    for _ in range(calls):
        fn()
    spent = time.thread_time() - t0
    torch.cuda.synchronize()
    return spent / calls * 1e6


def sd3_qkv_rows(add, timer, dev, sweep=False):
    """SD3.5-medium's attention inputs at 1024², batch 2 (cond and uncond), 24 heads of 64: per joint attention the
    host's split_qkv, ln_q / ln_k on each stream's qkv views and three cats (context 333 + image 4096 tokens) vs
    triton_rope.QKVHeads (one launch per stream); the image self-attention's q and k (4096 tokens, v stays a view).
    GPU time (graph replays) and host time per call (QKVHeads through its bound call)."""
    import torch
    import torch.nn.functional as F
    from comfyui_octet.kernels.backends import triton_rope
    heads, hd, b = 24, 64, 2
    segments = []
    for length in (333, 4096):
        segments.append((torch.randn(b, length, 3 * heads * hd, device=dev, dtype=torch.bfloat16),
                         1 + 0.1 * torch.randn(hd, device=dev, dtype=torch.bfloat16),
                         1 + 0.1 * torch.randn(hd, device=dev, dtype=torch.bfloat16), 1e-6, 1e-6))
    segments = tuple(segments)

    def split(x, wq, wk, eq, ek):
        q, k, v = x.reshape(x.shape[0], x.shape[1], 3, -1, hd).movedim(2, 0)
        return (F.rms_norm(q, (hd,), wq, eq).reshape(x.shape[0], x.shape[1], -1),
                F.rms_norm(k, (hd,), wk, ek).reshape(x.shape[0], x.shape[1], -1), v)

    def host():
        c, x = split(*segments[0]), split(*segments[1])
        return tuple(torch.cat((c[t], x[t]), dim=1) for t in range(3))

    def host_self():
        return split(*segments[1])

    joint, alone = triton_rope.QKVHeads(heads), triton_rope.QKVHeads(heads, with_v=False)
    ref, out = host(), joint(segments)
    err = max((a.float() - r.float()).abs().max().item() for a, r in zip(out, ref))
    moved = 2 * 2 * b * (333 + 4096) * 3 * heads * hd
    add("SD3.5 joint q/k/v, batch 2: split + ln_q/ln_k x2 + 3 cats (host ops)", timer(host))
    add(f"SD3.5 joint q/k/v, batch 2: QKVHeads {joint.config} (max |diff| {err:.3g})", timer(lambda: joint(segments)),
        moved)
    add("SD3.5 image self-attn q/k, batch 2: split + ln_q + ln_k (host ops)", timer(host_self))
    add(f"SD3.5 image self-attn q/k, batch 2: QKVHeads {alone.config}", timer(lambda: alone(segments[1:])),
        2 * 2 * b * 4096 * 2 * heads * hd)
    add("  host us/call: joint, host ops", host_us(host))
    add("  host us/call: joint, QKVHeads (bound)", host_us(lambda: joint(segments)))
    add("  host us/call: self-attn, host ops", host_us(host_self))
    add("  host us/call: self-attn, QKVHeads (bound)", host_us(lambda: alone(segments[1:])))
    bound = sum(callable(v) for v in joint._calls.values())
    add(f"  (joint site bound calls: {bound})", 0.0)
    configs = [(8, 4, 2), (16, 1, 4), (16, 2, 4), (16, 4, 4), (32, 2, 4), (32, 4, 4), (32, 4, 8), (64, 2, 8)]
    for config in configs if sweep else ():
        site = triton_rope.QKVHeads(heads, config=config)
        add(f"  QKVHeads joint config {config}", timer(lambda site=site: site(segments)), moved)


def wan_rows(add, timer, dev, sweep=False):
    """Wan 2.1 1.3B's q (or k) per self-attention at 832x480x33 frames (14,040 tokens, 12 heads of 128), batch 1
    and 2 (cfg): the host's ops (RMSNorm over the 1536-wide row, then 0.3.75's fp32 apply_rope1; 0.29 runs
    comfy-kitchen's RoPE kernel instead, so its saving is the norm's pass alone) vs triton_rope.row_norm_rope."""
    import torch
    import torch.nn.functional as F
    from comfyui_octet.kernels import torch_ref
    from comfyui_octet.kernels.backends import triton_rope
    heads, hd, length = 12, 128, 14040
    w = torch.randn(heads * hd, device=dev, dtype=torch.bfloat16)
    freqs = torch.randn(1, length, 1, hd // 2, 2, 2, device=dev)

    def rope1(x):   # comfy.ldm.flux.math.apply_rope1 (0.3.75)
        x_ = x.to(dtype=freqs.dtype).reshape(*x.shape[:-1], -1, 1, 2)
        out = freqs[..., 0] * x_[..., 0]
        out.addcmul_(freqs[..., 1], x_[..., 1])
        return out.reshape(*x.shape).type_as(x)

    for batch in (1, 2):
        x = torch.randn(batch, length, heads * hd, device=dev, dtype=torch.bfloat16)
        fused = triton_rope.row_norm_rope(x, w, 1e-6, freqs, heads)
        ref = torch_ref.row_norm_rope(x, w, 1e-6, freqs, heads)
        bad = ((fused.float() - ref.float()).abs() > 1e-2 * ref.float().abs().clamp_min(1)).float().mean().item()
        moved = 2 * x.numel() * 2 + length * hd * 2 * 4
        add(f"Wan q, batch {batch}: rms_norm + fp32 apply_rope1 (0.3.75 host ops)",
            timer(lambda x=x: rope1(F.rms_norm(x, (heads * hd,), w, 1e-6).view(batch, length, heads, hd))))
        add(f"Wan q, batch {batch}: rms_norm alone (0.29's pass before its RoPE kernel)",
            timer(lambda x=x: F.rms_norm(x, (heads * hd,), w, 1e-6)))
        add(f"Wan q, batch {batch}: row_norm_rope {triton_rope.ROW_CONFIG} (values off by >1%: {bad:.1e})",
            timer(lambda x=x: triton_rope.row_norm_rope(x, w, 1e-6, freqs, heads)), moved)
        for config in ((8, 4), (16, 8), (32, 4), (32, 8), (64, 8)) if sweep else ():
            add(f"  row_norm_rope (BLOCK_L, warps)={config}",
                timer(lambda x=x, c=config: triton_rope.row_norm_rope(x, w, 1e-6, freqs, heads, c)), moved)
        wan_norm_rows(add, timer, x, sweep)


def wan_norm_rows(add, timer, x, sweep=False):
    """Wan's block inputs at x's shape (e.chunk(6) views for the modulation): the self-attention's
    addcmul(e0, norm1(x), 1 + e1) as the host's two passes vs triton_layernorm.NormModulate (float out, the q/k/v
    projections stay bf16), and the FFN's (norm2) as the host's passes + the row quantizer vs
    triton_quant.NormRowQuantizer (ffn.0 is INT8); ``sweep``: both kernels' (rows per program, warps)."""
    import torch
    import torch.nn.functional as F
    from comfyui_octet.kernels.backends import triton_layernorm, triton_quant
    batch, length, k = x.shape
    mod = torch.randn(batch, 6, k, device=x.device, dtype=x.dtype)
    shift, mult = mod[:, 0:1], 1 + mod[:, 1:2]
    moved = 2 * x.numel() * x.element_size()
    add(f"Wan norm1 input, batch {batch}: layer_norm + addcmul (host ops)",
        timer(lambda: torch.addcmul(shift, F.layer_norm(x, (k,), None, None, 1e-6), mult)))
    norm = triton_layernorm.NormModulate()
    add(f"Wan norm1 input, batch {batch}: NormModulate {triton_layernorm.config_for(k)}",
        timer(lambda: norm(x, 1e-6, mult, shift)), moved)
    configs = ((1, 4), (1, 8), (2, 4), (2, 8), (4, 4), (4, 8), (8, 8))
    for config in configs if sweep else ():
        kern = triton_layernorm.NormModulate(config)
        add(f"  NormModulate (rows, warps)={config}", timer(lambda kern=kern: kern(x, 1e-6, mult, shift)), moved)
    rowq = triton_quant.RowQuantizer(k)
    add(f"Wan norm2 input, batch {batch}: layer_norm + addcmul + quantize_rows (host ops + row quantizer)",
        timer(lambda: rowq(torch.addcmul(shift, F.layer_norm(x, (k,), None, None, 1e-6), mult).reshape(-1, k))))
    quant = triton_quant.NormRowQuantizer(k)
    moved_q = x.numel() * (x.element_size() + 1)
    add(f"Wan norm2 input, batch {batch}: NormRowQuantizer {triton_quant.norm_launch_config(k)}",
        timer(lambda: quant(x, 1e-6, mult, shift)), moved_q)
    for config in configs if sweep else ():
        q = triton_quant.NormRowQuantizer(k, config=config)
        add(f"  NormRowQuantizer (rows, warps)={config}", timer(lambda q=q: q(x, 1e-6, mult, shift)), moved_q)


def flux_norm_rows(add, timer, dev, sweep=False):
    """Flux-dev's qkv / linear1 / fc1 inputs at 1024² (single blocks 4608 rows, double blocks' img 4096 and txt 512):
    addcmul(shift, layer_norm(x), 1 + scale) + the row quantizer as the host's passes vs
    triton_quant.NormRowQuantizer, with the plain row quantizer for scale; ``sweep``: (rows per program, warps).
    Compiled Flux-dev spent 3.0 ms a step in it (76 calls, 39.7 us each; H100 2026-12-06)."""
    import torch
    import torch.nn.functional as F
    from comfyui_octet.kernels.backends import triton_quant
    k = 3072
    mod = torch.randn(1, 1, 6 * k, device=dev, dtype=torch.bfloat16)
    shift, mult = mod[..., :k], 1 + mod[..., k:2 * k]
    rowq = triton_quant.RowQuantizer(k)
    for m in (4608, 4096, 512):
        x = torch.randn(1, m, k, device=dev, dtype=torch.bfloat16)
        moved = m * k * 3
        add(f"Flux {m} x {k}: layer_norm + addcmul + quantize_rows (host ops + row quantizer)",
            timer(lambda: rowq(torch.addcmul(shift, F.layer_norm(x, (k,), None, None, 1e-6), mult).reshape(m, k))))
        add(f"Flux {m} x {k}: plain quantize_rows (for scale)", timer(lambda: rowq(x.reshape(m, k))), moved)
        quant = triton_quant.NormRowQuantizer(k)
        add(f"Flux {m} x {k}: NormRowQuantizer {triton_quant.norm_launch_config(k)}",
            timer(lambda: quant(x, 1e-6, mult, shift)), moved)
        for config in ((1, 4), (1, 8), (1, 16), (2, 8), (2, 16), (4, 16)) if sweep else ():
            q = triton_quant.NormRowQuantizer(k, config=config)
            add(f"  NormRowQuantizer (rows, warps)={config}", timer(lambda q=q: q(x, 1e-6, mult, shift)), moved)


# (tokens, model width, hidden width) of the MLPs whose fc1 applies the GELU in its epilogue (octet/fusion.py), at
# the e2e bench's sizes: Wan 2.1 1.3B's FFN (832x480x33), Flux-dev's double-block img_mlp (1024²), SD3.5-medium's
# image-stream Mlp (1024²).
MLP_SHAPES = {"Wan 2.1 1.3B ffn": (14040, 1536, 8960), "Flux-dev img_mlp": (4096, 3072, 12288),
              "SD3.5-medium mlp": (4096, 1536, 6144)}


def mlp_rows(add, timer, dev, shapes=MLP_SHAPES):
    """An MLP's fc1 at MLP_SHAPES, dynamic W8A8 from codes already quantized: the GEMM then the host's GELU pass
    (what runs without the fusion) vs the GEMM with the GELU in its epilogue (triton_gemm.W8A8Gemm gelu=True),
    and the GEMM alone for scale; values against torch_ref's gemm_epilogue(gelu=True). And its fc2 followed by a
    block's gated residual (Wan's): the GEMM then the host's addcmul vs the residual in the GEMM's epilogue."""
    import torch
    import torch.nn.functional as F
    from comfyui_octet.kernels import torch_ref
    from comfyui_octet.kernels.backends import triton_gemm
    gen = torch.Generator(device=dev).manual_seed(0)
    for label, (m, d, h) in shapes.items():
        xq = torch.randint(-127, 128, (m, d), device=dev, dtype=torch.int8, generator=gen)
        xs = torch.rand(m, device=dev, generator=gen) * 0.01 + 0.005
        qw = torch.randint(-127, 128, (h, d), device=dev, dtype=torch.int8, generator=gen)
        ws = torch.rand(h, device=dev, generator=gen) * 1e-4 + 5e-5
        bias = torch.randn(h, device=dev, dtype=torch.bfloat16, generator=gen)
        plain = triton_gemm.W8A8Gemm(qw, ws, bias)
        fused = triton_gemm.W8A8Gemm(qw, ws, bias, gelu=True)
        rows = slice(0, 256)    # the reference's int matmul on a slice: the full one is seconds
        ref = torch_ref.gemm_epilogue(torch_ref.int_matmul(xq[rows].cpu(), qw.cpu()), xs[rows].cpu(), ws.cpu(),
                                      bias.cpu(), torch.bfloat16, gelu=True).float()
        got = fused.run(xq, xs, torch.bfloat16)[rows].float().cpu()
        off = ((got - ref).abs() > 1e-2 * ref.abs().clamp_min(1)).float().mean().item()
        moved = m * h * 2 * 2    # the GELU pass: reads and writes the hidden tensor (bf16)
        add(f"{label} fc1 {m}x{h}x{d}: GEMM alone", timer(lambda p=plain: p.run(xq, xs, torch.bfloat16)))
        add(f"{label} fc1: GEMM + host GELU pass",
            timer(lambda p=plain: F.gelu(p.run(xq, xs, torch.bfloat16), approximate="tanh")))
        add(f"{label} fc1: GEMM, GELU in the epilogue (values off by >1%: {off:.1e})",
            timer(lambda f=fused: f.run(xq, xs, torch.bfloat16)))
        add(f"{label}: host GELU pass alone", timer(lambda: F.gelu(torch.empty(m, h, device=dev,
                                                                              dtype=torch.bfloat16))), moved)
        # fc2 and the block's gated residual (Wan's addcmul(x, ffn(...), e5)): the GEMM then the host's addcmul
        # vs the residual in the GEMM's epilogue (W8A8Gemm.run_residual).
        hq = torch.randint(-127, 128, (m, h), device=dev, dtype=torch.int8, generator=gen)
        qw2 = torch.randint(-127, 128, (d, h), device=dev, dtype=torch.int8, generator=gen)
        ws2 = torch.rand(d, device=dev, generator=gen) * 1e-4 + 5e-5
        fc2 = triton_gemm.W8A8Gemm(qw2, ws2, torch.randn(d, device=dev, dtype=torch.bfloat16, generator=gen))
        res = torch.randn(1, m, d, device=dev, dtype=torch.bfloat16, generator=gen)
        gate = torch.randn(1, 6, d, device=dev, dtype=torch.bfloat16, generator=gen)[:, 5:6]
        fused_res = fc2.run_residual(hq, xs, res.view(m, d), gate, m, 6 * d).float()
        host_res = torch.addcmul(res, fc2.run(hq, xs, torch.bfloat16).view(1, m, d), gate).view(m, d).float()
        off = ((fused_res - host_res).abs() > 1e-2 * host_res.abs().clamp_min(1)).float().mean().item()
        add(f"{label} fc2 {m}x{d}x{h}: GEMM + host addcmul (gated residual)",
            timer(lambda: torch.addcmul(res, fc2.run(hq, xs, torch.bfloat16).view(1, m, d), gate)))
        add(f"{label} fc2: GEMM, residual in the epilogue (values off the host's by >1%: {off:.1e})",
            timer(lambda: fc2.run_residual(hq, xs, res.view(m, d), gate, m, 6 * d)))


def groupnorm_rows(add, timer, dev, sweep=False):
    """SDXL's GroupNorms at 1024² (batch 1, 32 groups): a ResBlock's GroupNorm + SiLU at each UNet level (and the
    decoder's concatenated inputs), the host's F.group_norm then F.silu vs triton_groupnorm.group_norm."""
    import torch
    import torch.nn.functional as F
    from comfyui_octet.kernels.backends import triton_groupnorm
    for c, hw in ((320, 128), (640, 64), (1280, 32), (2560, 32), (960, 64)):
        x = torch.randn(1, c, hw, hw, device=dev, dtype=torch.bfloat16)
        w, b = torch.randn(c, device=dev, dtype=torch.bfloat16), torch.randn(c, device=dev, dtype=torch.bfloat16)
        moved = 3 * x.numel() * 2     # two reads (statistics, apply) and one write
        add(f"GroupNorm+SiLU {c}x{hw}x{hw}: host ops", timer(lambda: F.silu(F.group_norm(x, 32, w, b, 1e-6))))
        add(f"GroupNorm+SiLU {c}x{hw}x{hw}: group_norm", timer(
            lambda: triton_groupnorm.group_norm(x, 32, w, b, 1e-6, silu=True)), moved)
        for config in ((512, 4096, 4), (1024, 2048, 4), (2048, 8192, 8), (4096, 16384, 8)) if sweep else ():
            add(f"  group_norm (BLOCK, CHUNK, warps)={config}", timer(
                lambda config=config: triton_groupnorm.group_norm(x, 32, w, b, 1e-6, silu=True, config=config)),
                moved)


def geglu_rows(add, timer, dev, sweep=False):
    """SDXL's GEGLU gates at 1024² (batch 1): 4096 tokens x 2560 and 1024 x 5120, the host's chunk, F.gelu and
    multiply vs triton_geglu.geglu."""
    import torch
    import torch.nn.functional as F
    from comfyui_octet.kernels.backends import triton_geglu

    def host(h):
        x, gate = h.chunk(2, dim=-1)
        return x * F.gelu(gate)
    for m, d in ((4096, 2560), (1024, 5120)):
        h = torch.randn(1, m, 2 * d, device=dev, dtype=torch.bfloat16)
        moved = 3 * m * d * 2
        add(f"GEGLU gate {m}x{d}: host ops", timer(lambda: host(h)))
        add(f"GEGLU gate {m}x{d}: geglu", timer(lambda: triton_geglu.geglu(h)), moved)
        for config in ((512, 4), (2048, 4), (2048, 8), (4096, 8)) if sweep else ():
            add(f"  geglu (BLOCK, warps)={config}", timer(lambda config=config: triton_geglu.geglu(h, config)), moved)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=os.path.join(ROOT, "out", "bench"))
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--only", choices=["unet", "wan", "sd3", "mlp", "flux_norm"],
                    help="only these rows (unet: GroupNorm, GEGLU; wan: Wan's q/k; sd3: SD3.5's q/k/v preparation; "
                         "mlp: fc1's GELU in the GEMM's epilogue vs a GELU pass; flux_norm: Flux's norm quantizer)")
    args = ap.parse_args()
    octet_pack.load(comfy=False)
    import torch
    import torch.nn.functional as F
    from comfyui_octet.kernels.backends import triton_quant
    from overhead import card_header
    header = card_header("deferred-input quantizers, CUDA-graph GPU time; ")[2]
    print(header, flush=True)
    m, d, h = 4608, 3072, 12288
    dev = "cuda"
    attn = torch.randn(1, m, d, device=dev, dtype=torch.bfloat16)
    lin1 = torch.randn(1, m, 3 * d + h, device=dev, dtype=torch.bfloat16)
    pre = lin1[..., 3 * d:]
    x = torch.randn(1, m, d, device=dev, dtype=torch.bfloat16)
    mod = torch.randn(1, 1, 6 * d, device=dev, dtype=torch.bfloat16)
    shift, mult = mod[..., :d], 1 + mod[..., d:2 * d]
    rowq = {k: triton_quant.RowQuantizer(k) for k in (d, d + h, h)}
    rows = []

    def add(name, us, bytes_moved=None):
        row = {"case": name, "us": round(us, 1)}
        if bytes_moved:
            row["TB/s"] = round(bytes_moved / us / 1e6, 2)
        rows.append(row)
        print(f"{name:70s} {us:8.1f} us" + (f"  {row['TB/s']} TB/s" if bytes_moved else ""), flush=True)

    if args.only == "wan":
        wan_rows(add, graph_us, dev, args.sweep)
        return write(args, header, rows)
    if args.only == "sd3":
        sd3_qkv_rows(add, graph_us, dev, args.sweep)
        return write(args, header, rows)
    if args.only == "mlp":
        mlp_rows(add, graph_us, dev)
        return write(args, header, rows)
    if args.only == "flux_norm":
        flux_norm_rows(add, graph_us, dev, args.sweep)
        return write(args, header, rows)
    if args.only == "unet":
        groupnorm_rows(add, graph_us, dev, args.sweep)
        geglu_rows(add, graph_us, dev, args.sweep)
        return write(args, header, rows)
    cat_gelu = triton_quant.GeluRowQuantizer(d, h)
    add("single block: gelu + cat + quantize_rows (float passes)",
        graph_us(lambda: rowq[d + h](torch.cat((attn, F.gelu(pre, approximate="tanh")), 2).reshape(m, d + h))))
    moved = m * (d + h) * 3
    add("single block: GeluRowQuantizer (default config)", graph_us(lambda: cat_gelu(attn, pre)), moved)
    # Two sweeps over tiles, or (BLOCK_K >= 15360) the whole row in registers, the GELU computed once.
    gelu_configs = ([(b, w) for b in (1024, 2048, 4096, 8192) for w in (4, 8, 16)]
                    + [(16384, 8), (16384, 16), (16384, 32)])
    for block_k, warps in gelu_configs if args.sweep else ():
        q = triton_quant.GeluRowQuantizer(d, h, config=(block_k, warps))
        add(f"  GeluRowQuantizer BLOCK_K={block_k} warps={warps}", graph_us(lambda q=q: q(attn, pre)), moved)
    mlp_gelu = triton_quant.GeluRowQuantizer(0, h)
    fc1_out = torch.randn(1, m, h, device=dev, dtype=torch.bfloat16)
    add("double block MLP: gelu + quantize_rows",
        graph_us(lambda: rowq[h](F.gelu(fc1_out, approximate="tanh").reshape(m, h))))
    add("double block MLP: GeluRowQuantizer", graph_us(lambda: mlp_gelu(None, fc1_out)), m * h * 3)
    norm = triton_quant.NormRowQuantizer(d)
    add("qkv input: layer_norm + addcmul + quantize_rows",
        graph_us(lambda: rowq[d](torch.addcmul(shift, F.layer_norm(x, (d,), None, None, 1e-6), mult).reshape(m, d))))
    add("qkv input: NormRowQuantizer", graph_us(lambda: norm(x, 1e-6, mult, shift)), m * d * 3)
    add("plain quantize_rows K=3072 (for scale)", graph_us(lambda: rowq[d](x.reshape(m, d))), m * d * 3)
    qk_rows(add, graph_us, dev, args.sweep)
    sd3_rows(add, graph_us, dev)
    sd3_qkv_rows(add, graph_us, dev, args.sweep)
    wan_rows(add, graph_us, dev, args.sweep)
    mlp_rows(add, graph_us, dev)
    groupnorm_rows(add, graph_us, dev, args.sweep)
    geglu_rows(add, graph_us, dev, args.sweep)
    return write(args, header, rows)


def write(args, header, rows) -> int:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "deferred_kernels.json"), "w") as f:
        json.dump({"header": header, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
