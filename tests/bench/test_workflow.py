"""bench/workflow.py on the CPU (--tiny): whole KSampler prompts per variant, written as JSON. On a CPU the
Quantize Model default runs eager (no CUDA), so its latent must equal cuda_graph 'off' bit for bit, and the
float model through the CUDA Graph Step node must equal the float model."""
from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_tiny_workflow_bench_writes_paired_rows(tmp_path):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "workflow.py"), "--tiny", "--models", "sd1.5",
                          "--variants", "bf16", "octet", "octet_eager", "bf16_graph", "--steps", "2", "--rounds", "2",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    rows = {r["variant"]: r for r in json.load(open(tmp_path / "workflow_sd1.5.json"))["rows"]}
    assert set(rows) == {"bf16", "octet", "octet_eager", "bf16_graph"}
    assert rows["octet"]["vs_octet_eager"]["max_abs"] == 0.0 and rows["bf16_graph"]["vs_bf16"]["max_abs"] == 0.0
    assert 0.0 < rows["octet"]["vs_bf16"]["max_abs"] < 1.0          # INT8 differs from float, a little
    assert rows["bf16"]["speedup_vs_bf16"] == 1.0 and all(len(r["prompt_s_rounds"]) == 2 for r in rows.values())
    assert all(r["vs_own_first_prompt"]["max_abs"] == 0.0 for r in rows.values())    # deterministic on a CPU
    assert rows["octet"]["graph_stats"]["replays"] == 0 and rows["octet"]["graph_stats"]["eager"] > 0
    assert "graph_stats" not in rows["octet_eager"] and "CUDA graphs: off" in rows["octet_eager"]["how"]


def test_tiny_workflow_bench_with_the_hosts_dynamic_vram_says_what_it_got(tmp_path):
    """--dynamic-vram (ComfyUI 0.29's NVIDIA default) on a CPU: ComfyUI 0.3.75 has none, 0.29's comfy-aimdo needs a
    GPU; the run goes on with the plain patcher and the JSON says which."""
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "workflow.py"), "--tiny", "--models", "sd1.5",
                          "--variants", "bf16", "octet", "--steps", "2", "--rounds", "1", "--dynamic-vram",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    data = json.load(open(tmp_path / "workflow_sd1.5_dynamic_vram.json"))
    assert data["versions"]["dynamic_vram"] in ("off: this host has no dynamic VRAM",
                                                "off: comfy-aimdo did not initialise")
    rows = {r["variant"]: r for r in data["rows"]}
    assert "patcher ModelPatcher, dynamic False" in rows["octet"]["how"]
    assert rows["octet"]["vs_own_first_prompt"]["max_abs"] == 0.0
