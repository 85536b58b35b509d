"""bench/lean_blocks.py on the CPU (the proxy run): it refuses to time a lean block that differs from the host's
(bit for bit, float and INT8) and writes one row per case (SDXL's two stacks, SD3.5's two joint blocks) and
variant, plus Octet lean against stock bf16."""
from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_lean_blocks_bench_writes_paired_rows(tmp_path):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "lean_blocks.py"), "--rounds", "2", "--reps", "1",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    data = json.load(open(tmp_path / "lean_blocks.json"))
    assert data["header"].startswith("card: cpu (proxy: tiny widths)")
    rows = data["rows"]
    cases = ("sdxl 640ch x2", "sdxl 1280ch x10", "sd3.5 joint, x self-attn", "sd3.5 joint")
    switch = rows.pop()
    assert switch["case"] == "switch read" and switch["ns_os_environ_get"] > 0 and switch["ns_switches_on"] > 0
    assert [(r["case"], r["variant"]) for r in rows] == [(c, v) for c in cases
                                                         for v in ("bf16", "octet", "octet lean vs bf16 host")]
    for r in rows:
        assert r["host_over_lean"] > 0 and r["rounds"] == 2
        if r["variant"] != "octet lean vs bf16 host":
            assert r["lean_us_per_block"] > 0 and r["host_us_per_block"] > 0
