"""bench/linear_host_cost.py on the CPU (tiny shapes): one row per phase (before any model, after bf16 steps, after
Octet steps, after bf16 again), each with a host time per bare call."""
from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_linear_host_cost_bench_writes_a_row_per_phase(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "linear_host_cost.py"), "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600, env=dict(env, CUDA_VISIBLE_DEVICES=""))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    rows = json.load(open(tmp_path / "linear_host_cost_cpu.json"))["rows"]
    assert [r["phase"] for r in rows] == ["before any model", "after bf16 SDXL steps", "after Octet SDXL steps",
                                          "after bf16 SDXL steps again"]
    for r in rows:
        times = [v for k, v in r.items() if k not in ("phase", "card")]
        assert len(times) == 3 and all(t > 0 for t in times)


def _run(tmp_path, *flags):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "linear_host_cost.py"), *flags,
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=600,
                         env=dict(env, CUDA_VISIBLE_DEVICES=""))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out.stdout


def test_gemm_ways_times_each_way_here_and_in_a_child_without_cublaslt(tmp_path):
    """--gemm-ways: a row in this process and one from the child with DISABLE_ADDMM_CUDA_LT=1, the same ways."""
    _run(tmp_path, "--gemm-ways")
    rows = json.load(open(tmp_path / "gemm_ways_cpu.json"))["rows"]
    assert [r["env"] for r in rows] == ["default", "DISABLE_ADDMM_CUDA_LT=1"]
    ways = [{k for k in r if k not in ("card", "env", "shape")} for r in rows]
    assert ways[0] == ways[1] and "F.linear(x, w, b)" in ways[0]
    assert all(r[k] > 0 for r in rows for k in ways[0])


def test_attention_times_each_backend_that_runs_against_the_first(tmp_path):
    """--attention on a CPU: cuDNN / memory-efficient refuse (said), flash and math run, each compared with the
    first that ran (differences at float32 rounding)."""
    text = _run(tmp_path, "--attention")
    assert "cudnn unavailable" in text
    rows = json.load(open(tmp_path / "attention_backends_cpu.json"))["rows"]
    assert {r["backend"] for r in rows} == {"flash", "math"} and len(rows) == 10
    assert all(r["host_us"] > 0 and r["max_diff"] < 1e-4 for r in rows)


def test_mlp_times_the_chained_forward_and_the_hosts_in_one_row(tmp_path):
    """--mlp: one row with host and wall us per call for the chained MLP and the host's forward, fc1 planned on
    Triton's backend (the CPU proxy's stand-in runs)."""
    _run(tmp_path, "--mlp")
    rows = json.load(open(tmp_path / "mlp_host_cpu.json"))["rows"]
    assert len(rows) == 1 and rows[0]["fc1_plan"] == "triton" and rows[0]["shape"] == [16, 32, 64]
    times = {k: v for k, v in rows[0].items() if k.startswith(("host_us", "wall_us"))}
    assert len(times) == 4 and all(v > 0 for v in times.values())
