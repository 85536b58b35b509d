"""bench/fused_ops_host.py on the CPU (the proxy run, stand-in launchers): it refuses to time a case unless the
bound site made its bound call and the unbound one made none, and writes one row per case with the host's ops,
Octet's general path and its bound call."""
from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_fused_ops_host_bench_writes_a_row_per_site(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "OCTET_BIND")}
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "fused_ops_host.py"), "--rounds", "2",
                          "--reps", "2", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600,
                         env=dict(env, CUDA_VISIBLE_DEVICES=""))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    data = json.load(open(tmp_path / "fused_ops_host_cpu.json"))
    assert data["header"].startswith("card: cpu (proxy: tiny shapes, stand-in launches)")
    assert [r["kind"] for r in data["rows"]] == ["groupnorm"] * 3 + ["geglu"] * 2 + ["conv"] * 3
    for r in data["rows"]:
        assert r["rounds"] == 2 and r["calls_per_sdxl_step"] > 0
        assert all(r[f"host_us {v}"] > 0 for v in ("host", "octet unbound", "octet bound"))
    assert data["host_ms_saved_per_sdxl_step"] == sum(r["host_ms_saved_per_step"] for r in data["rows"])
