"""Where a planned INT8 layer's host time goes, piece by piece, and what cuBLASLt's int8 GEMM would do.

Part 1 (host): at one Flux-dev shape (3072 -> 9216, M=16, where the GPU work is small and a call
costs what the host spends issuing it) each piece of the Triton dynamic W8A8 path is timed alone:
the layer, its plan's run function, the prepared quantizer and GEMM (direct launches, see
kernels/backends/triton_launch.py) and their one-shot forms (Triton's dispatch), the allocations
and descriptors they make, the autotuner's launch, Triton's JIT launch with the chosen config, the
compiled kernel's own launcher, an empty kernel, and bf16 F.linear for scale. Then a cProfile of the layer's calls.

Part 2 (GPU): at Flux-dev shapes, M=4096, CUDA-graph timing (no host cost): bf16 cuBLAS, our
quantize + Triton GEMM, the Triton GEMM alone, and torch._int_mm (cuBLASLt int8) alone and with
the dequantization done by torch ops.

    python3 bench/launch_cost.py [--reps 500] [--out docs/bench]
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import octet_pack  # noqa: E402
from overhead import card_header, measure  # noqa: E402  (bench/overhead.py's header and host-time loop)


def host_us(fn, reps: int) -> float:
    """CPU time per call to issue ``reps`` calls back to back (GPU work here is far shorter)."""
    return measure(fn, reps)[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=500)
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "bench"))
    parser.add_argument("--host-only", action="store_true", help="skip part 2 (GPU timing)")
    args = parser.parse_args()
    octet_pack.load()
    import logging
    logging.basicConfig(level=logging.WARNING)
    import torch
    import torch.nn.functional as F
    import triton
    from triton.testing import do_bench_cudagraph
    from comfyui_octet.kernels.backends import triton_gemm, triton_quant
    from comfyui_octet.kernels.torch_ref import scale_from_absmax
    from comfyui_octet.octet.modules import QuantLinear

    if not torch.cuda.is_available():
        print("bench/launch_cost.py times GPU launches: it needs a CUDA device.")
        return 1
    card, stamp, header = card_header()
    print(header, flush=True)
    rows: list[dict] = []

    def report(part, name, value, unit):
        rows.append({"part": part, "piece": name, "value": round(value, 2), "unit": unit})
        print(f"  {name:<58} {value:9.1f} {unit}", flush=True)

    def timed(name, fn):
        try:
            report("host", name, host_us(fn, args.reps), "us/call")
        except Exception as exc:  # a diagnostic: one piece failing must not hide the others
            print(f"  {name:<58} failed: {type(exc).__name__}: {exc}", flush=True)

    dev, dt = "cuda", torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    k, n, m = 3072, 9216, 16
    lin = torch.nn.Linear(k, n, device=dev, dtype=dt)
    layer = QuantLinear.from_float(lin, "dynamic", "triton")
    x = torch.randn(m, k, device=dev, dtype=dt, generator=g)

    print(f"\nPart 1: host us per call, {k}->{n}, M={m}, dynamic W8A8 through Triton", flush=True)
    with torch.no_grad():
        plan = layer.plan(x)
        xq, xs = triton_quant.quantize_rows(x)
        q, s, b = layer.weight, plan.operands.scale, plan.operands.bias
        out = triton_gemm.w8a8_gemm(xq, xs, q, s, b, dt)
        timed("bf16 F.linear", lambda: F.linear(x, lin.weight, lin.bias))
        timed("QuantLinear.forward (dynamic, triton)", lambda: layer(x))
        timed("plan.run", lambda: plan.run(x, None))
        timed("quantize_rows one-shot (Triton dispatch)", lambda: triton_quant.quantize_rows(x))
        timed("w8a8_gemm one-shot (Triton dispatch)", lambda: triton_gemm.w8a8_gemm(xq, xs, q, s, b, dt))
        quantizer, gemm = triton_quant.RowQuantizer(k), triton_gemm.W8A8Gemm(q, s, b)
        timed("RowQuantizer call (prepared, direct launch)", lambda: quantizer(x))
        timed("W8A8Gemm call (prepared, direct launch)", lambda: gemm(xq, xs, dt))
        print(f"  (direct launches: quantizer {quantizer.launcher.direct} {len(quantizer.launcher.records)} keys, "
              f"GEMM {gemm.launcher.direct} {len(gemm.launcher.records)} keys)", flush=True)
        timed("torch.empty [M, N] bf16", lambda: torch.empty((m, n), dtype=dt, device=dev))
        timed("x.reshape(-1, k).contiguous()", lambda: x.reshape(-1, k).contiguous())
        timed("_vector(w_scale)", lambda: triton_gemm._vector(s, xq.device))
        timed("TensorDescriptor.from_tensor", lambda: triton_gemm.TensorDescriptor.from_tensor(xq, [16, 16]))
        timed("torch.cuda.current_stream()", lambda: torch.cuda.current_stream())
        try:
            from triton.runtime import driver
            timed("triton driver get_current_stream", lambda: driver.active.get_current_stream(0))
            timed("triton driver get_current_device", lambda: driver.active.get_current_device())
        except Exception as exc:
            print("  triton driver pieces failed:", exc)

        # The GEMM's own launch, with every argument prepared as w8a8_gemm prepares it.
        a_arg = triton_gemm.TensorDescriptor.from_tensor(xq, [16, 16])
        b_arg = triton_gemm.TensorDescriptor.from_tensor(q, [16, 16])
        av, wv = triton_gemm._vector(xs, xq.device), triton_gemm._vector(s, xq.device)
        sms = triton_gemm.triton_support.num_sms(0)
        kern = triton_gemm._w8a8_kernel
        pos = (a_arg, b_arg, out, av, wv, b, wv, wv, m, n, k, triton_gemm.m_bucket(m), sms, k, k, n, 1)
        flags = dict(HAS_BIAS=True, USE_TMA=True, GELU_QUANT=False, HAS_Q_SMOOTH=False)

        def grid(meta):
            tiles = triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"])
            return (min(tiles, sms) if meta["PERSISTENT"] else tiles,)
        timed("autotuned launch _w8a8_kernel[grid](...)", lambda: kern[grid](*pos, **flags))
        best = getattr(kern, "best_config", None)
        print(f"  (best config: {best})", flush=True)
        if best is not None:
            best_kw = best.all_kwargs()
            nargs = dict(zip(kern.fn.arg_names, pos)) | flags | best.kwargs
            if best.pre_hook is not None:
                best.pre_hook(nargs)
            timed("pre_hook (descriptor boxes)", lambda: best.pre_hook(nargs))
            g0 = grid(best.kwargs)
            timed("JIT launch, config fixed: fn[grid](...)", lambda: kern.fn[g0](*pos, **flags, **best_kw))
            try:
                compiled = kern.fn.run(*pos, grid=g0, warmup=False, **flags, **best_kw)
                full = dict(zip(kern.fn.arg_names, pos)) | flags | best.kwargs
                all_args = [full[name] for name in kern.fn.arg_names]
                stream = torch.cuda.current_stream().cuda_stream
                launch = compiled.run
                fn_handle, meta = compiled.function, compiled.packed_metadata

                def direct():
                    launch(g0[0], 1, 1, stream, fn_handle, meta, None, None, None, *all_args)
                timed("compiled.run(...) direct (TMA descriptors filled)", direct)
                check = torch.empty_like(out)
                all_args[2] = check
                direct()
                torch.cuda.synchronize()
                print(f"  (direct launch equals the normal one: {torch.equal(check, out)})", flush=True)
            except Exception as exc:
                print(f"  direct launch failed: {type(exc).__name__}: {exc}", flush=True)

        @triton.jit
        def _empty_kernel(p, n_el):
            pass
        timed("empty Triton kernel[(1,)](ptr, int)", lambda: _empty_kernel[(1,)](out, 1))
        one_tile, block_k, warps = triton_quant.row_launch_config(k)
        xs2 = torch.empty((m,), dtype=torch.float32, device=dev)
        timed("quantize JIT launch only", lambda: triton_quant._quantize_rows_kernel[(m,)](
            x, x, xs2, xq, xs2, k, k, HAS_SMOOTH=False, STATIC=False, ONE_TILE=one_tile,
            SCALE_BY_RECIPROCAL=True, BLOCK_K=block_k, num_warps=warps))
        xq32 = torch.randint(-127, 128, (32, k), device=dev, dtype=torch.int8)
        wt = q.t()
        timed("torch._int_mm [32, K] x [K, N] (cuBLASLt)", lambda: torch._int_mm(xq32, wt))

        prof = cProfile.Profile()
        prof.enable()
        for _ in range(300):
            layer(x)
        prof.disable()
        torch.cuda.synchronize()
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(22)
        print("\ncProfile of 300 QuantLinear.forward calls (tottime):")
        print("\n".join(line for line in text.getvalue().splitlines() if line.strip())[:6000], flush=True)

    print("\nPart 2: GPU us per call in a CUDA graph, M=4096", flush=True)
    shapes = [] if args.host_only else [
        ("flux qkv", 3072, 9216), ("flux mlp fc1", 3072, 12288), ("flux mlp fc2", 12288, 3072),
        ("flux single linear1", 3072, 21504), ("flux single linear2", 15360, 3072)]
    m = 4096
    with torch.no_grad():
        for name, k, n in shapes:
            w = torch.randn(n, k, device=dev, dtype=dt, generator=g) * 0.02
            x = torch.randn(m, k, device=dev, dtype=dt, generator=g)
            ws = scale_from_absmax(w.float().abs().amax(1, keepdim=True))
            q = torch.round(w.float() / ws).clamp(-127, 127).to(torch.int8)
            bias = torch.randn(n, device=dev, dtype=dt, generator=g)
            wsv = ws.reshape(-1).contiguous()
            xq, xs = triton_quant.quantize_rows(x)
            qt = q.t()
            cands = {
                "bf16 F.linear": lambda: F.linear(x, w, bias),
                "quantize + Triton GEMM":
                    lambda: triton_gemm.w8a8_gemm(*triton_quant.quantize_rows(x), q, wsv, bias, dt),
                "Triton GEMM only": lambda: triton_gemm.w8a8_gemm(xq, xs, q, wsv, bias, dt),
                "torch._int_mm only": lambda: torch._int_mm(xq, qt),
                "torch._int_mm + torch dequant": lambda: torch.addcmul(bias.float(), torch._int_mm(xq, qt).float(),
                                                                      xs[:, None] * wsv[None, :]).to(dt),
            }
            base = None
            for label, fn in cands.items():
                try:
                    fn()
                    t = do_bench_cudagraph(fn, rep=40) * 1e3
                except Exception as exc:
                    print(f"  {name:<20} {label:<32} failed: {type(exc).__name__}: {exc}", flush=True)
                    continue
                base = base or t
                tflops = 2 * m * n * k / t / 1e6
                rows.append({"part": "gpu", "shape": name, "m": m, "k": k, "n": n, "piece": label,
                             "value": round(t, 2), "unit": "us", "vs_bf16": round(base / t, 3)})
                print(f"  {name:<20} {label:<32} {t:8.1f} us  {base / t:5.2f}x bf16  {tflops:6.0f} TFLOP/s",
                      flush=True)
    os.makedirs(args.out, exist_ok=True)
    tag = card.replace("NVIDIA ", "").split()[0].lower()
    path = os.path.join(args.out, f"launch_cost_{tag}_{stamp[:10]}.json")
    with open(path, "w") as f:
        json.dump({"header": header, "rows": rows}, f, indent=1)
    print("wrote", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
