"""Why bench/kernels.py's "gemm" column for Wan's FFN up (M=14040, 8960 x 1536) read 1.22 ms while a W8A8Gemm built
once ran 0.36 ms (H100, 2026-12-06): the same shape with kernels.py's operands, one change at a time (bias, random
codes, the one-shot w8a8_gemm), bf16 F.linear beside. Runs without a ComfyUI host: python3 bench/gemm_operands.py."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gemm_shapes import graph_ms, write_json  # noqa: E402  (it puts the repository root on sys.path)
from kernels import torch_ref  # noqa: E402
from kernels.backends import triton_gemm, triton_quant  # noqa: E402


def main():
    card = torch.cuda.get_device_name()
    m, n, k, dev, dt = 14040, 8960, 1536, "cuda", torch.bfloat16
    torch.manual_seed(0)
    x = torch.randn(m, k, device=dev, dtype=dt)
    w = torch.randn(n, k, device=dev, dtype=dt) * 0.02
    bias = torch.randn(n, device=dev, dtype=dt)
    qw, ws = torch_ref.quantize_weight(w)
    print("qw", qw.dtype, tuple(qw.shape), qw.stride(), "ws", ws.dtype, tuple(ws.shape), flush=True)
    xq, xs = triton_quant.quantize_rows(x)
    qr = torch.randint(-127, 128, (n, k), device=dev, dtype=torch.int8)
    res = {}
    def built_once(weight, b):
        gemm = triton_gemm.W8A8Gemm(weight, ws, b)
        return lambda: gemm.run(xq, xs, dt)

    for name, fn in [
            ("built once, kernels.py operands, bias", built_once(qw, bias)),
            ("built once, kernels.py operands, no bias", built_once(qw, None)),
            ("built once, random codes, no bias", built_once(qr, None)),
            ("one-shot w8a8_gemm, kernels.py operands, bias", lambda: triton_gemm.w8a8_gemm(xq, xs, qw, ws, bias, dt)),
            ("one-shot w8a8_gemm, random codes, no bias", lambda: triton_gemm.w8a8_gemm(xq, xs, qr, ws, None, dt)),
            ("bf16 F.linear", lambda: torch.nn.functional.linear(x, w, bias))]:
        res[name] = graph_ms(fn)
        print(f"[{card}] M={m} N={n} K={k} {name}: {res[name] * 1e3:.1f} us", flush=True)
    # Which kernels each path launches, and for how long (a different kernel or config would show here)
    from torch.profiler import ProfilerActivity, profile
    for name, fn in [("built once", built_once(qw, bias)),
                     ("one-shot", lambda: triton_gemm.w8a8_gemm(xq, xs, qw, ws, bias, dt))]:
        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
        kernels_seen = [(e.key, e.count, e.device_time_total / max(e.count, 1))
                        for e in prof.key_averages() if e.device_time_total > 0]
        print(f"[{card}] {name}: " + "; ".join(f"{key[:60]} x{count} {us:.1f} us" for key, count, us in kernels_seen),
              flush=True)
    print("codes |mean| x", xq.float().abs().mean().item(), "w", qw.float().abs().mean().item(),
          "rand", qr.float().abs().mean().item())
    write_json("gemm_operands.json", dict(card=card, torch=torch.__version__,
                                          us={name: v * 1e3 for name, v in res.items()}))


if __name__ == "__main__":
    main()
