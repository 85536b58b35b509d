"""bench/deferred_kernels.py's MLP rows on the CPU (Triton's interpreter, a tiny shape, calls counted instead of
timed): the three fc1 variants and the GELU pass, and the GELU epilogue's values checked against torch_ref."""
from __future__ import annotations

import os
import sys

import pytest

from comfyui_octet.kernels.backends import triton_support

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.skipif(not triton_support.interpreting(), reason="needs TRITON_INTERPRET=1 (CPU tensors)")
def test_mlp_rows_time_each_fc1_variant_and_check_the_epilogue(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "bench"))
    monkeypatch.syspath_prepend(os.path.join(ROOT, "scripts"))
    sys.modules.pop("deferred_kernels", None)
    import deferred_kernels
    rows, called = [], []

    def timer(fn):
        out = fn()
        called.append(tuple(out.shape))
        return 2.0

    deferred_kernels.mlp_rows(lambda name, us, moved=None: rows.append((name, us, moved)), timer, "cpu",
                              {"tiny": (40, 32, 48)})
    names = [r[0] for r in rows]
    assert names[0] == "tiny fc1 40x48x32: GEMM alone" and names[1] == "tiny fc1: GEMM + host GELU pass"
    assert names[2] == "tiny fc1: GEMM, GELU in the epilogue (values off by >1%: 0.0e+00)"
    assert names[3] == "tiny: host GELU pass alone" and rows[3][2] == 40 * 48 * 4
    assert called == [(40, 48)] * 4
