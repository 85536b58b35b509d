"""octet/rope_table.py on the real host's EmbedND (Flux's RoPE table): with OCTET_COMPILE_ROPE_TABLE=1 Quantize
installs its forward, eager calls give the host's table bit for bit, and a traced forward holds one opaque
octet::rope_table call (no float64 cos / sin for Inductor to fuse) that computes the same table."""
import importlib.util
import os

import pytest
import torch
import torch.nn as nn

from comfyui_octet import octet
from comfyui_octet.kernels import ops
from comfyui_octet.octet import rope_table

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_spec = importlib.util.spec_from_file_location("bench_rope_table", os.path.join(ROOT, "bench", "rope_table.py"))
bench_rope_table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_rope_table)


class Embedder(nn.Module):
    """A DiT's front, as Flux's forward uses it: the table of ids, and a layer for Quantize to replace."""

    def __init__(self):
        super().__init__()
        from comfy.ldm.flux.layers import EmbedND
        self.pe_embedder = EmbedND(dim=16, theta=10000, axes_dim=[4, 6, 6])
        self.proj = nn.Linear(32, 32)

    def forward(self, ids, x):
        return self.pe_embedder(ids), self.proj(x)


def flux_ids(h=3, w=5, txt=4):
    return bench_rope_table.flux_ids(h, w, txt)       # the bench's layout of Flux's ids, small


def test_the_switch_installs_the_forward_and_eager_is_the_hosts_table(monkeypatch):
    ids = flux_ids()
    expected = Embedder().pe_embedder(ids)
    monkeypatch.delenv("OCTET_COMPILE_ROPE_TABLE", raising=False)
    assert octet.quantize_(Embedder(), octet.DynamicW8A8Config()).forwards.keys().isdisjoint({"pe_embedder"})
    monkeypatch.setenv("OCTET_COMPILE_ROPE_TABLE", "1")
    model = Embedder()
    result = octet.quantize_(model, octet.DynamicW8A8Config())
    assert isinstance(result.forwards["pe_embedder"], rope_table.RopeTableForward)
    assert isinstance(model.pe_embedder.__dict__["forward"], rope_table.RopeTableForward)
    table = model.pe_embedder(ids)
    assert table.shape == (1, 1, 19, 8, 2, 2) and table.dtype == torch.float32 and torch.equal(table, expected)


def test_a_traced_forward_calls_the_op_and_gets_the_same_table(monkeypatch):
    monkeypatch.setenv("OCTET_COMPILE_ROPE_TABLE", "1")
    model = Embedder()
    octet.quantize_(model, octet.DynamicW8A8Config())
    ids, x = flux_ids(), torch.randn(2, 32, generator=torch.Generator().manual_seed(0))
    graphs = []

    def capture(gm, inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        table, _ = torch.compile(model, backend=capture, fullgraph=True)(ids, x)
    code = graphs[0].code
    assert len(graphs) == 1 and "octet.rope_table" in code and "cos" not in code and "linspace" not in code
    assert torch.equal(table, Embedder().pe_embedder(ids))
    torch.library.opcheck(torch.ops.octet.rope_table.default,
                          (ids, 10000.0, [4, 6, 6], model.pe_embedder.forward.owner))
    torch._dynamo.reset()


def test_the_op_without_its_module_says_what_to_do():
    with pytest.raises(RuntimeError, match="compile the MODEL again"):
        ops.rope_table(flux_ids(), 10000.0, [4, 6, 6], 10 ** 9)
