"""Compile every Triton kernel for the GPU (Hopper, sm90) on a machine without one; run by test_gpu_compile.py.

CI runs the kernels under TRITON_INTERPRET=1, which checks their numbers but never Triton's real
compiler: a construct the interpreter accepts and the compiler rejects (a non-constexpr global, a
dtype the MMA lowering refuses, a wrong constexpr branch) would only fail on a GPU. ``triton.compile``
with an explicit target runs the whole pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin, with the ptxas
that ships with Triton) without a device. It must run without TRITON_INTERPRET (under it, @triton.jit
gives interpreter functions the compiler cannot take), hence a separate process.

    .venv/bin/python tests/kernels/gpu_compile.py     # prints one line per case, exits 1 on any failure
"""
import importlib.util
import os
import sys
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if "comfyui_octet" not in sys.modules:
    spec = importlib.util.spec_from_file_location("comfyui_octet", os.path.join(ROOT, "__init__.py"),
                                                  submodule_search_locations=[ROOT])
    sys.modules["comfyui_octet"] = importlib.util.module_from_spec(spec)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from comfyui_octet.kernels.backends import (triton_attention, triton_conv, triton_geglu,  # noqa: E402
                                            triton_gemm, triton_groupnorm, triton_layernorm, triton_quant,
                                            triton_rope, triton_w8a16, triton_w8a8_static)

TARGET = GPUTarget("cuda", 90, 32)
CASES = []


def case(fn):
    CASES.append(fn)
    return fn


# Runtime arguments the kernels take as Python floats (Triton types them fp32).
FLOATS = frozenset(("eps", "eps_q", "eps_k", "pre"))


def _compile(kernel, pointers: dict, constexprs: dict, options: dict | None = None):
    """Compile ``kernel`` with pointer args typed by ``pointers`` (name -> dtype, default fp32), FLOATS fp32, every
    other runtime arg i32, and ``constexprs``."""
    fn = kernel
    while not isinstance(fn, triton.runtime.JITFunction):  # autotuned kernels wrap the JITFunction
        fn = fn.fn
    sig = {}
    for p in fn.params:
        if p.is_constexpr:
            sig[p.name] = "constexpr"
        elif p.name in pointers:
            t = pointers[p.name]
            sig[p.name] = t if t.startswith(("*", "tensordesc")) else "*" + t
        elif p.name.endswith("_ptr"):
            sig[p.name] = "*fp32"
        elif p.name in FLOATS:
            sig[p.name] = "fp32"
        else:
            sig[p.name] = "i32"
    compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs), target=TARGET,
                              options=options)
    assert compiled.asm.get("cubin"), f"{fn.__name__}: no cubin"


@case
def quantize_rows():
    # every (one tile?, width, warps) row_launch_config hands out: one 2048 tile, two sweeps of 1024 and of 4096
    for k in (1536, 3072, 8960, 17000):
        one_tile, block_k, warps = triton_quant.row_launch_config(k)
        for static in (False, True):
            _compile(triton_quant._quantize_rows_kernel, {"x_ptr": "bf16", "q_ptr": "i8"},
                     dict(HAS_SMOOTH=True, STATIC=static, ONE_TILE=one_tile, SCALE_BY_RECIPROCAL=True,
                          BLOCK_K=block_k), dict(num_warps=warps))


@case
def layer_norm_modulation_float_and_quantized():
    # The float kernel (Wan's self-attention input) and the INT8 one share norm_modulate_rows: several rows per
    # program (2-D reductions) and one.
    for block_m in (1, 2):
        _compile(triton_layernorm._norm_modulate_kernel,
                 {"x_ptr": "bf16", "mult_ptr": "bf16", "shift_ptr": "bf16", "o_ptr": "bf16"},
                 dict(HAS_MULT=True, HAS_SHIFT=True, BLOCK_M=block_m, BLOCK_K=2048))
    # Dynamic codes by the scale's reciprocal (the default) and by the division.
    for static, block_m, reciprocal in ((False, 1, True), (True, 1, True), (False, 4, True), (False, 1, False)):
        _compile(triton_quant._quantize_norm_rows_kernel,
                 {"x_ptr": "bf16", "mult_ptr": "bf16", "shift_ptr": "bf16", "q_ptr": "i8"},
                 dict(HAS_MULT=True, HAS_SHIFT=True, HAS_SMOOTH=True, STATIC=static, SCALE_BY_RECIPROCAL=True,
                      BLOCK_M=block_m, BLOCK_K=2048, RECIPROCAL_CODES=reciprocal))


@case
def qk_preparation_rope_and_norms():
    bf16 = {n: "bf16" for n in ("q_ptr", "k_ptr", "wq_ptr", "wk_ptr", "oq_ptr", "ok_ptr", "x_ptr", "w_ptr", "o_ptr")}
    for rope in (True, False):
        _compile(triton_rope._qk_norm_rope_kernel, bf16, dict(D=128, BLOCK_L=16, HEADS=1, ROPE=rope))
    _compile(triton_rope._row_norm_rope_kernel, bf16, dict(D=128, BLOCK_L=16))
    for v in (True, False):
        _compile(triton_rope._qkv_heads_kernel, bf16, dict(D=64, BLOCK_L=16, HEADS=1, V=v))


@case
def group_norm_and_geglu():
    _compile(triton_groupnorm._gn_stats_kernel, {"x_ptr": "bf16"}, dict(BLOCK=1024, CHUNK=4096))
    _compile(triton_groupnorm._gn_apply_kernel, {"x_ptr": "bf16", "w_ptr": "bf16", "b_ptr": "bf16", "y_ptr": "bf16"},
             dict(BLOCK=1024, CHUNK=4096, SPLIT_P=8, AFFINE=True, SILU=True))
    _compile(triton_geglu._geglu_kernel, {"h_ptr": "bf16", "o_ptr": "bf16"}, dict(BLOCK=1024))


@case
def conv_activation_quantization():
    _compile(triton_quant._sample_absmax_kernel, {"x_ptr": "bf16"}, dict(HAS_SMOOTH=True, BLOCK=1024))
    for static in (False, True):
        _compile(triton_quant._quantize_nchw_to_nhwc_kernel, {"x_ptr": "bf16", "q_ptr": "i8"},
                 dict(HAS_SMOOTH=True, STATIC=static, SCALE_BY_RECIPROCAL=True, BLOCK_CHUNKS=64, BLOCK_C=64,
                      BLOCK_HW=64))


@case
def flux_single_block_cat_gelu_quantization():
    for static in (False, True):
        for one_tile, reciprocal in ((False, False), (True, False), (True, True)):
            _compile(triton_quant._quantize_cat_gelu_kernel, {"a_ptr": "bf16", "g_ptr": "bf16", "q_ptr": "i8"},
                     dict(HAS_SMOOTH=True, STATIC=static, SCALE_BY_RECIPROCAL=True, BLOCK_K=1024, ONE_TILE=one_tile,
                          RECIPROCAL_CODES=reciprocal))


W8A8_TILE = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8)


@case
def w8a8_gemm_pointer_operands():
    for gelu_quant in (False, True):
        _compile(triton_gemm._w8a8_kernel, {"a": "i8", "b": "i8", "c_ptr": "bf16"},
                 dict(HAS_BIAS=True, USE_TMA=False, GELU_QUANT=gelu_quant, HAS_Q_SMOOTH=gelu_quant, GELU=not gelu_quant, PERSISTENT=False,
                      **W8A8_TILE))


@case
def w8a8_gemm_residual_epilogue():
    for tma in (False, True):
        desc = "tensordesc<i8[128, 128]>" if tma else "i8"
        _compile(triton_gemm._w8a8_residual_kernel,
                 {"a": desc, "b": desc, "c_ptr": "bf16", "res_ptr": "bf16", "gate_ptr": "bf16", "bias_ptr": "bf16"},
                 dict(HAS_BIAS=True, USE_TMA=tma, PERSISTENT=False, **W8A8_TILE))


@case
def w8a8_gemm_tma_operands():
    desc = "tensordesc<i8[128, 128]>"
    for persistent in (False, True):
        _compile(triton_gemm._w8a8_kernel, {"a": desc, "b": desc, "c_ptr": "bf16"},
                 dict(HAS_BIAS=True, USE_TMA=True, GELU_QUANT=False, HAS_Q_SMOOTH=False, GELU=False, PERSISTENT=persistent,
                      **W8A8_TILE))


@case
def w8a16_gemm_and_dequantize():
    _compile(triton_w8a16._w8a16_kernel, {"x": "bf16", "w": "i8", "c_ptr": "bf16"},
             dict(HAS_BIAS=True, USE_TMA=False, DOT_IN_FP32=False, DOT_PRECISION="tf32", BLOCK_M=64, BLOCK_N=128,
                  BLOCK_K=64, GROUP_M=8, SWAP_AB=False))
    _compile(triton_w8a16._dequantize_kernel, {"q_ptr": "i8", "out_ptr": "bf16"}, dict(BLOCK_K=1024))


@case
def int8_attention_quantizer_and_kernel():
    # The q/k quantizer (k smoothed and not), and the attention kernel at every GPU tile config (int8 wgmma for
    # q·kᵀ, bf16 for p·v; its full and its masked last key block), head_dims 128, 64 and padded 40, 16.
    for mean, d in ((True, 128), (False, 40)):
        _compile(triton_attention._quantize_qk_kernel,
                 {"q_ptr": "bf16", "k_ptr": "bf16", "qc_ptr": "i8", "kc_ptr": "i8"},
                 dict(HAS_MEAN=mean, SCALE_BY_RECIPROCAL=True, BLOCK_T=64, D=d, BLOCK_D=triton_attention.block_d(d)))
    pointers = {"qc_ptr": "i8", "kc_ptr": "i8", "v_ptr": "bf16", "o_ptr": "bf16"}
    for config in triton_attention._attention_kernel.configs:      # the autotuner's list, as a GPU process has it
        for d in (128, 64, 40, 16):
            _compile(triton_attention._attention_kernel, pointers,
                     dict(FP32_PV=False, D=d, BLOCK_D=triton_attention.block_d(d), **config.kwargs),
                     dict(num_warps=config.num_warps, num_stages=config.num_stages))
    # bench/attention_int8.py's comparison: the same kernel with q·kᵀ in bf16
    _compile(triton_attention._attention_kernel, dict(pointers, qc_ptr="bf16", kc_ptr="bf16"),
             dict(FP32_PV=False, D=128, BLOCK_D=128, BLOCK_M=128, BLOCK_N=64, QK_INT8=False),
             dict(num_warps=4, num_stages=3))


@case
def int8_conv_implicit_gemm():
    _compile(triton_conv._conv_kernel, {"x_ptr": "i8", "w_ptr": "i8", "y_ptr": "bf16"},
             dict(KH=3, KW=3, POINTWISE=False, HAS_BIAS=True, W_TMA=False, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64,
                  GROUP_M=8))


@case
def static_prologue_gemm():
    _compile(triton_w8a8_static._w8a8_static_kernel, {"x": "bf16", "w": "i8", "c_ptr": "bf16"},
             dict(HAS_VEC=True, EXACT=True, HAS_BIAS=True, USE_TMA=False, BLOCK_M=128, BLOCK_N=128, BLOCK_K=128,
                  GROUP_M=8))


def main() -> int:
    failed = 0
    for fn in CASES:
        try:
            fn()
            print(f"ok {fn.__name__}", flush=True)
        except Exception:
            failed += 1
            print(f"FAILED {fn.__name__}\n{traceback.format_exc()}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
