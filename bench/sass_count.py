"""SASS instructions a thread issues in the row quantizers, compiled for Hopper (sm_90) on a machine without a GPU.

Why: at Flux's widths these kernels are bound by instruction issue, not memory (docs/BENCHMARKS.md, thirty-first
session: the GELU quantizer's 116M warp instructions are ~80 % of its 146.8 us on an H100), so the count is what a
change to them moves. Triton's own ptxas and cuobjdump compile and disassemble; the arguments are marked 16-byte
aligned / divisible, as Triton's launcher specializes them at run time (unaligned, every load is scalar). Counts the
main body (up to the first EXIT; the division's slow path is a subroutine it calls).

    .venv/bin/python bench/sass_count.py [--out DIR]      # prints one line per kernel, writes sass_count.json
"""
import argparse
import collections
import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.environ.get("TRITON_INTERPRET") == "1":   # @triton.jit would give interpreter functions, which do not compile
    sys.exit("bench/sass_count.py compiles for a GPU target: run it without TRITON_INTERPRET=1")
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import octet_pack  # noqa: E402

octet_pack.load()

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from comfyui_octet.kernels.backends import triton_quant  # noqa: E402

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
GELU_SIG = {"a_ptr": "*bf16", "g_ptr": "*bf16", "smooth_ptr": "*fp32", "static_ptr": "*fp32", "q_ptr": "*i8",
            "scale_ptr": "*fp32", "K1": "i32", "K2": "i32", "stride_am": "i32", "stride_gm": "i32"}
NORM_SIG = {"x_ptr": "*bf16", "mult_ptr": "*bf16", "shift_ptr": "*bf16", "smooth_ptr": "*fp32", "static_ptr": "*fp32",
            "q_ptr": "*i8", "scale_ptr": "*fp32", "M": "i32", "K": "i32", "L": "i32", "stride_xm": "i32",
            "stride_mb": "i32", "stride_sb": "i32", "eps": "fp32"}


def sass(kernel, signature: dict, constexprs: dict, warps: int) -> collections.Counter:
    """Opcode counts of ``kernel``'s main body, every pointer and integer argument but ``eps`` 16-divisible."""
    sig = dict(signature, **{name: "constexpr" for name in constexprs})
    aligned = {(i,): [["tt.divisibility", 16]] for i, (name, t) in enumerate(signature.items()) if t != "fp32"}
    compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=constexprs, attrs=aligned),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"octet_sass_{os.getpid()}.cubin")
    with open(path, "wb") as f:
        f.write(compiled.asm["cubin"])
    try:
        text = subprocess.run([os.path.join(BIN, "cuobjdump"), "-sass", path], capture_output=True, text=True,
                              check=True).stdout
    finally:
        os.remove(path)
    ops = collections.Counter()
    for line in text.splitlines():
        m = re.search(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
        if m:
            ops[m.group(1).split(".")[0]] += 1
            if m.group(1) == "EXIT":
                break
    return ops


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="out/bench")
    args = ap.parse_args()
    common = dict(HAS_SMOOTH=False, STATIC=False, SCALE_BY_RECIPROCAL=True)
    cases = {  # name -> (kernel, signature, constexprs, warps, elements a thread)
        "GELU quantizer, Flux 3072 + 12288, 32 warps, division": (
            triton_quant._quantize_cat_gelu_kernel, GELU_SIG,
            dict(common, BLOCK_K=16384, ONE_TILE=True, RECIPROCAL_CODES=False), 32, 16),
        "GELU quantizer, Flux 3072 + 12288, 32 warps, reciprocal codes": (
            triton_quant._quantize_cat_gelu_kernel, GELU_SIG,
            dict(common, BLOCK_K=16384, ONE_TILE=True, RECIPROCAL_CODES=True), 32, 16),
        "GELU quantizer, Flux 3072 + 12288, 8 warps, reciprocal codes": (   # the default since 2026-12-06
            triton_quant._quantize_cat_gelu_kernel, GELU_SIG,
            dict(common, BLOCK_K=16384, ONE_TILE=True, RECIPROCAL_CODES=True), 8, 64),
        "norm quantizer, Flux 3072, (1 row, 4 warps), division": (
            triton_quant._quantize_norm_rows_kernel, NORM_SIG,
            dict(common, HAS_MULT=True, HAS_SHIFT=True, BLOCK_M=1, BLOCK_K=4096, RECIPROCAL_CODES=False), 4, 32),
        "norm quantizer, Flux 3072, (1 row, 4 warps), reciprocal codes": (
            triton_quant._quantize_norm_rows_kernel, NORM_SIG,
            dict(common, HAS_MULT=True, HAS_SHIFT=True, BLOCK_M=1, BLOCK_K=4096, RECIPROCAL_CODES=True), 4, 32)}
    rows = []
    for name, (kernel, signature, constexprs, warps, elements) in cases.items():
        ops = sass(kernel, signature, constexprs, warps)
        total = sum(ops.values())
        rows.append({"kernel": name, "warps": warps, "instructions_a_thread": total, "elements_a_thread": elements,
                     "top": dict(ops.most_common(8))})
        print(f"{name:62s} {total:5d} instructions a thread ({total / elements:.1f} an element)  "
              + " ".join(f"{op} {n}" for op, n in ops.most_common(6)))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "sass_count.json"), "w") as f:
        json.dump({"triton": triton.__version__, "target": "sm_90", "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
