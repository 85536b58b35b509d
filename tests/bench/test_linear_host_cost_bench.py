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
