"""The row quantizers' bandwidth at the big-M shapes (Wan 14,040 tokens, Flux 4,608, SD3.5 4,250): a RowQuantizer
built once as a plan keeps it (row_launch_config), the same with two sweeps forced, against a candidate that holds
ROWS whole rows per program in registers, every (ROWS, warps); the GELU row quantizer (an MLP's fc2 input) at its
default against the whole row in one tile per warp count. Each timed alone in a CUDA graph, codes and scales
checked equal to the default's first; prints GB/s (bytes read + written) and writes JSON.

The H100 call of 2026-12-06 timed the one-shot quantize_rows here, which then launched its kernel three times per
call (a fresh launcher learning its direct launch, fixed since: registry.one_call_plans): its 123.6 / 55.1 / 647 us
are three launches; the candidates' rows were one launch each."""
import argparse
import json
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kernels.backends import triton_quant, triton_support  # noqa: E402
from kernels.backends.triton_math import round_to_int8, scale_from_absmax  # noqa: E402
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gemm_shapes import graph_ms  # noqa: E402  (bench/gemm_shapes.py: GPU time in a CUDA graph)


@triton.jit
def _rows_in_registers(x_ptr, q_ptr, scale_ptr, M, K, ROWS: tl.constexpr, BLOCK_K: tl.constexpr,
                       SCALE_BY_RECIPROCAL: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    offs = tl.arange(0, BLOCK_K)
    mask = (rows < M)[:, None] & (offs < K)[None, :]
    v = tl.load(x_ptr + rows[:, None] * K + offs[None, :], mask=mask, other=0.0).to(tl.float32)
    scale = scale_from_absmax(tl.max(tl.abs(v), axis=1), SCALE_BY_RECIPROCAL)
    tl.store(scale_ptr + rows, scale, mask=rows < M)
    tl.store(q_ptr + rows[:, None] * K + offs[None, :], round_to_int8(tl.div_rn(v, scale[:, None])), mask=mask)


def candidate(x, rows, warps):
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    s = torch.empty((m,), dtype=torch.float32, device=x.device)
    _rows_in_registers[(triton_support.cdiv(m, rows),)](x, q, s, m, k, ROWS=rows,
                                                         BLOCK_K=triton_support.next_power_of_2(k),
                                                         SCALE_BY_RECIPROCAL=x.is_cuda, num_warps=warps)
    return q, s


def _time(row: dict, name: str, fn, label: str) -> None:
    """GPU time of ``fn`` alone (gemm_shapes.graph_ms) into row["us"][name], printed with its GB/s."""
    row["us"][name] = graph_ms(fn) * 1000
    print(f"{label} {name:14s} {row['us'][name]:8.1f} us {row['bytes'] / row['us'][name] / 1e3:6.0f} GB/s", flush=True)


def _check_and_time(row: dict, variants: dict, run, reference, label: str, cuda: bool) -> None:
    """Each variant's codes against ``reference`` (q, s): the scales equal, a code within one of it on < 0.1 % of
    codes (the division's and the reciprocal's codes differ so); then its GPU time (``_time``) on a GPU.
    ``run(quantizer)`` calls one variant."""
    ref_q, ref_s = reference
    for name, quantizer in variants.items():
        q, s = run(quantizer)
        moved = (q.int() - ref_q.int()).abs()
        assert torch.equal(s, ref_s) and moved.max() <= 1 and moved.float().mean() < 1e-3, (label, name)
        if cuda:
            _time(row, name, lambda qz=quantizer: run(qz), label)


def _two_sweeps(k):
    """row_launch_config's rule for rows over 2048 wide, at any width: tiles of a quarter of the row."""
    block_k = min(4096, max(1024, triton_support.next_power_of_2(k) // 4))
    return False, block_k, 4 if block_k <= 1024 else 8


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="out/bench")
    ap.add_argument("--shapes", default="14040x1536,14040x8960,4608x3072,4608x12288,4096x1536")
    ap.add_argument("--gelu-shapes", default="4250x0x6144,14040x0x8960,4608x3072x12288")
    ap.add_argument("--norm-shapes", default="4608x3072,14040x1536")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    card = torch.cuda.get_device_name() if cuda else "cpu (interpreter)"
    rows_out = []
    for shape in args.shapes.split(","):
        m, k = map(int, shape.split("x"))
        if not cuda:
            m, k = min(m, 20), min(k, 300)
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16) * 3
        ref_q, ref_s = triton_quant.quantize_rows(x)
        row = {"M": m, "K": k, "bytes": m * k * 3 + m * 4, "us": {}}
        plan = triton_quant.RowQuantizer(k)
        default = triton_quant.row_launch_config
        triton_quant.row_launch_config = _two_sweeps
        try:
            swept = triton_quant.RowQuantizer(k)
        finally:
            triton_quant.row_launch_config = default
        row["default"] = default(k)
        for quantizer in (plan, swept):
            q, s = quantizer(x)
            assert torch.equal(q, ref_q) and torch.equal(s, ref_s), (shape, quantizer.flags)
        variants = {"plan default": lambda: plan(x), "two sweeps": lambda: swept(x)}
        for rows in (1, 2, 4, 8):
            for warps in (4, 8):
                if rows * triton_support.next_power_of_2(k) > 32768:
                    continue
                q, s = candidate(x, rows, warps)
                assert torch.equal(q, ref_q) and torch.equal(s, ref_s), (shape, rows, warps)
                variants[f"rows{rows}_w{warps}"] = (lambda r=rows, w=warps: candidate(x, r, w))
        if cuda:
            for name, fn in variants.items():
                _time(row, name, fn, f"[{card}] quantize {m}x{k}")
        rows_out.append(row)
    # The GELU row quantizer (an MLP's fc2 input: SD3.5 6144, Wan 8960; Flux's single block 3072 head + 12288):
    # its default (two sweeps up to 8192 wide) against the whole row in one tile at 4/8/16/32 warps (Flux's 15,360-wide
    # rows: 153.9 us at 16 warps on an H100, 2.4x the time its bytes take at the card's bandwidth; one 16-warp
    # program holds a whole row's registers on an SM, so 32 warps halve each thread's share)
    for shape in args.gelu_shapes.split(","):
        m, k1, k2 = map(int, shape.split("x"))
        if not cuda:
            m, k1, k2 = min(m, 20), min(k1, 40), min(k2, 300)
        head = torch.randn(m, k1, device=dev, dtype=torch.bfloat16) if k1 else None
        pre = torch.randn(m, k2, device=dev, dtype=torch.bfloat16) * 2
        default = triton_quant.GeluRowQuantizer(k1, k2)
        ref_q, ref_s = default(head, pre)
        row = {"M": m, "K1": k1, "K2": k2, "bytes": m * (k1 + k2) * 3 + m * 4, "default":
               triton_quant.gelu_row_launch_config(k1 + k2), "us": {}}
        variants = {"gelu default": default}
        whole = triton_support.next_power_of_2(k1 + k2)
        # The whole row's codes by the scale's reciprocal (the default: a third fewer instructions a thread, and the
        # kernel is issue-bound at Flux's width) and by the division ("divided": within a code of it), per warp count
        for warps in (4, 8, 16, 32):
            if whole // (warps * 32) <= 128:      # at most 128 fp32 values per thread
                variants[f"gelu whole w{warps}"] = triton_quant.GeluRowQuantizer(k1, k2, None, (whole, warps))
                if warps >= 16:
                    variants[f"gelu whole w{warps} divided"] = triton_quant.GeluRowQuantizer(
                        k1, k2, None, (whole, warps), reciprocal_codes=False)
        _check_and_time(row, variants, lambda qz: qz(head, pre), (ref_q, ref_s),
                        f"[{card}] gelu-quantize {m}x({k1}+{k2})", cuda)
        rows_out.append(row)
    # The norm quantizer (Flux's and SD3's qkv / fc1 input, Wan's norm1 + modulation) with its codes by the scale's
    # reciprocal (the default; ptxas sm_90: 40 % fewer instructions a thread at 3072 wide) and by the division
    for shape in args.norm_shapes.split(","):
        m, k = map(int, shape.split("x"))
        if not cuda:
            m, k = min(m, 20), min(k, 300)
        x = torch.randn(1, m, k, device=dev, dtype=torch.bfloat16) * 3 + 0.5
        mod = torch.randn(1, 1, 2 * k, device=dev, dtype=torch.bfloat16)
        mult, shift = 1 + mod[..., :k], mod[..., k:]
        default = triton_quant.NormRowQuantizer(k)
        row = {"M": m, "K": k, "norm": True, "bytes": m * k * 3 + m * 4, "us": {}}
        variants = {"norm default": default, "norm divided": triton_quant.NormRowQuantizer(k, reciprocal_codes=False)}
        _check_and_time(row, variants, lambda qz: qz(x, 1e-6, mult, shift), default(x, 1e-6, mult, shift),
                        f"[{card}] norm-quantize {m}x{k}", cuda)
        rows_out.append(row)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "quant_rows_sweep.json"), "w") as f:
        json.dump({"card": card, "torch": torch.__version__, "triton": triton.__version__, "rows": rows_out}, f,
                  indent=1)
    print("checked equal to the default quantizers (codes by the division within one):",
          [f"{r['M']}x{r.get('K', r.get('K2'))}" for r in rows_out])


if __name__ == "__main__":
    main()
