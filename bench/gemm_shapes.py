"""The INT8 GEMM as a plan calls it (a W8A8Gemm built once) against bf16 F.linear at Wan 2.1's and Flux's linear
shapes, at M = 4608, Wan's 14,040 tokens, 14,048 / 14,080 (16- and 128-aligned) and 16,384: GPU time in a CUDA
graph, TOPS, the row quantizer's time beside, and the autotuner's timing of every tile at each new key. Written when
bench/kernels.py's one-shot "gemm" column read 0.45x bf16 at Wan's shapes (H100, 2026-12-06); this read 1.28-1.76x.
Runs without a ComfyUI host: python3 bench/gemm_shapes.py (JSON to $OUT/bench or out/bench)."""
import json
import os
import sys

import torch
import triton
import triton.testing

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kernels.backends import triton_gemm, triton_quant  # noqa: E402


def graph_ms(fn) -> float:
    """GPU time alone (the calls captured in a CUDA graph and replayed), as bench/kernels.py's bench_graph."""
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")


def write_json(name: str, payload: dict) -> None:
    dest = os.path.join(os.environ.get("OUT", "out"), "bench")
    os.makedirs(dest, exist_ok=True)
    with open(os.path.join(dest, name), "w") as f:
        json.dump(payload, f, indent=1)


def _tuning_line(ct) -> str:
    return "; ".join(f"{c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']}x{c.kwargs['BLOCK_K']}"
                     f"{'p' if c.kwargs['PERSISTENT'] else ''} w{c.num_warps}s{c.num_stages} "
                     f"{(t[0] if isinstance(t, (list, tuple)) else t) * 1e3:.0f}" for c, t in ct.items())


def main():
    dev, card = "cuda", torch.cuda.get_device_name()
    rows, seen = [], set()
    for (n, k) in [(8960, 1536), (1536, 1536), (1536, 8960), (3072, 3072), (12288, 3072)]:
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16)
        qw = torch.randint(-127, 128, (n, k), device=dev, dtype=torch.int8)
        ws = torch.rand(n, device=dev) * 0.01
        gemm = triton_gemm.W8A8Gemm(qw, ws, None)
        for m in [4608, 14040, 14048, 14080, 16384]:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            xq, xs = triton_quant.quantize_rows(x)
            t_int = graph_ms(lambda: gemm.run(xq, xs, torch.bfloat16))
            ct = getattr(triton_gemm._w8a8_kernel, "configs_timings", None)
            if ct and id(ct) not in seen:
                seen.add(id(ct))
                print("  tuning:", _tuning_line(ct), flush=True)
            t_bf = graph_ms(lambda: torch.nn.functional.linear(x, w))
            t_q = graph_ms(lambda: triton_quant.quantize_rows(x))
            flops = 2 * m * n * k
            r = dict(m=m, n=n, k=k, int8_ms=t_int, bf16_ms=t_bf, quant_ms=t_q, ratio=t_bf / t_int,
                     int8_tops=flops / t_int / 1e9, bf16_tflops=flops / t_bf / 1e9)
            rows.append(r)
            print(f"[{card}] M={m:5d} N={n:5d} K={k:4d}: int8 {t_int * 1e3:7.1f} us ({r['int8_tops']:5.0f} TOPS) "
                  f"bf16 {t_bf * 1e3:7.1f} us ({r['bf16_tflops']:4.0f}) ratio {r['ratio']:.2f}x "
                  f"quant_rows {t_q * 1e3:6.1f} us", flush=True)
    print("autotune cache:", {str(key): str(v) for key, v in triton_gemm._w8a8_kernel.cache.items()})
    write_json("gemm_shapes.json", dict(card=card, torch=torch.__version__, triton=triton.__version__, rows=rows))


if __name__ == "__main__":
    main()
