"""bench/deferred_kernels.py's MLP and Wan norm rows on the CPU (Triton's interpreter, tiny shapes, calls counted
instead of timed): each variant a row, the epilogues' values checked against torch_ref / the host's ops."""
from __future__ import annotations

import os
import sys

import pytest

from comfyui_octet.kernels.backends import triton_support

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


pytestmark = pytest.mark.skipif(not triton_support.interpreting(), reason="needs TRITON_INTERPRET=1 (CPU tensors)")


@pytest.fixture
def bench(monkeypatch):
    """(bench/deferred_kernels.py freshly imported, a timer that runs each call once and records its output's shape
    (the first of a tuple's) instead of timing it, the shapes)."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "bench"))
    monkeypatch.syspath_prepend(os.path.join(ROOT, "scripts"))
    sys.modules.pop("deferred_kernels", None)
    import deferred_kernels
    shapes = []

    def timer(fn):
        out = fn()
        shapes.append(tuple((out[0] if isinstance(out, tuple) else out).shape))
        return 2.0
    return deferred_kernels, timer, shapes


def test_mlp_rows_time_each_fc1_variant_and_check_the_epilogue(bench):
    deferred_kernels, timer, called = bench
    rows = []

    deferred_kernels.mlp_rows(lambda name, us, moved=None: rows.append((name, us, moved)), timer, "cpu",
                              {"tiny": (40, 32, 48)})
    names = [r[0] for r in rows]
    assert names[0] == "tiny fc1 40x48x32: GEMM alone" and names[1] == "tiny fc1: GEMM + host GELU pass"
    assert names[2] == "tiny fc1: GEMM, GELU in the epilogue (values off by >1%: 0.0e+00)"
    assert names[3] == "tiny: host GELU pass alone" and rows[3][2] == 40 * 48 * 4
    assert names[4] == "tiny fc2 40x32x48: GEMM + host addcmul (gated residual)"
    assert names[5] == "tiny fc2: GEMM, residual in the epilogue (values off the host's by >1%: 0.0e+00)"
    assert called == [(40, 48)] * 4 + [(1, 40, 32), (40, 32)]


def test_wan_norm_rows_time_host_ops_and_both_kernels_with_their_sweeps(bench):
    import torch
    deferred_kernels, timer, shapes = bench
    rows = []
    x = torch.randn(2, 9, 48)
    deferred_kernels.wan_norm_rows(lambda name, us, moved=None: rows.append(name), timer, x, sweep=True)
    assert rows[0].startswith("Wan norm1 input, batch 2: layer_norm + addcmul") and "NormModulate" in rows[1]
    assert sum(r.startswith("  NormModulate") for r in rows) == 7
    assert sum(r.startswith("  NormRowQuantizer") for r in rows) == 7
    assert shapes[:2] == [(2, 9, 48)] * 2 and shapes[-1] == (18, 48)
