"""The INT8 Attention override (octet/attention.py) inside the host's own attention functions (wrap_attn calls it
with the host's function): the layouts ComfyUI hands it, its output against exact attention, the calls it leaves to
the host (logged once), the node's clone, a CUDA-graph key, and a trace without graph breaks."""
import logging

import pytest
import torch
import torch.nn.functional as F

from comfyui_octet.kernels.backends import triton_support
from comfyui_octet.octet import attention as octet_attention
from compile_checks import assert_compiles_as_eager

pytestmark = pytest.mark.skipif(triton_support.unavailable_reason() is not None or not triton_support.interpreting(),
                                reason="needs Triton (TRITON_INTERPRET=1 on CPU)")


def _qkv(b=1, sq=24, sk=40, heads=2, d=64, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(b, sq, heads * d, generator=g) * 2).to(dtype)
    k = (torch.randn(b, sk, heads * d, generator=g) * 2 + 6 * torch.randn(heads * d, generator=g)).to(dtype)
    v = torch.randn(b, sk, heads * d, generator=g).to(dtype)
    return q, k, v


def _exact(q, k, v, heads):
    b, sq, _ = q.shape
    split = [t.float().unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v)]
    return F.scaled_dot_product_attention(*split).transpose(1, 2).reshape(b, sq, -1)


def _cosine(a, b):
    return F.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0).item()


@pytest.fixture
def host():
    import comfy.ldm.modules.attention as attention
    return attention


@pytest.fixture
def kernel_calls(monkeypatch):
    from comfyui_octet.kernels.backends import triton_attention
    calls = []
    real = triton_attention.attention

    def counted(q, k, v, scale=None, smooth_k=True):
        calls.append(tuple(q.shape))
        return real(q, k, v, scale, smooth_k)
    monkeypatch.setattr(triton_attention, "attention", counted)
    return calls


def test_the_hosts_layouts_go_through_the_kernel(host, kernel_calls):
    q, k, v = _qkv()
    to = {octet_attention.OPTION: octet_attention.Int8Attention()}
    exact = _exact(q, k, v, 2)
    out = host.attention_pytorch(q, k, v, 2, transformer_options=to)           # [B, S, H*D] in and out (SD3, Wan)
    assert out.shape == q.shape and out.dtype == q.dtype and kernel_calls == [(1, 24, 2, 64)]
    assert _cosine(out, exact) > 0.9995
    heads_first = [t.unflatten(-1, (2, 64)).transpose(1, 2) for t in (q, k, v)]  # Flux: [B, H, S, D] in
    flux = host.attention_pytorch(*heads_first, 2, skip_reshape=True, transformer_options=to)
    assert torch.equal(flux, out)
    wan_i2v = host.attention_pytorch(*heads_first, 2, skip_reshape=True, skip_output_reshape=True,
                                     transformer_options=to)                   # [B, H, S, D] out
    assert torch.equal(wan_i2v, out.unflatten(-1, (2, 64)).transpose(1, 2))
    sd3 = host.attention_pytorch(q, k, v.unflatten(-1, (2, 64)), heads=2, transformer_options=to)  # v [B, S, H, D]
    assert torch.equal(sd3, out)
    scaled = host.attention_pytorch(q, k, v, 2, scale=0.05, transformer_options=to)
    split = [t.float().unflatten(-1, (2, -1)).transpose(1, 2) for t in (q, k, v)]
    assert _cosine(scaled, F.scaled_dot_product_attention(*split, scale=0.05).transpose(1, 2).flatten(2)) > 0.9995
    assert len(kernel_calls) == 5


@pytest.mark.parametrize("case,reason", [
    ("mask", "an attention mask"),
    ("fp32", "dtype torch.float32"),
    ("head_dim", "head_dim 36"),
    ("extra", "argument 'var_length'"),
])
def test_calls_the_kernel_does_not_take_run_the_hosts_attention(host, kernel_calls, caplog, monkeypatch, case,
                                                                reason):
    from comfyui_octet.kernels import registry
    monkeypatch.setattr(registry, "_logged", set())     # said once per process: not by a test that ran before
    q, k, v = _qkv(d=36 if case == "head_dim" else 64, dtype=torch.float32 if case == "fp32" else torch.bfloat16)
    kwargs = {}
    if case == "mask":
        kwargs["mask"] = torch.zeros(24, 40, dtype=q.dtype)
    seen = []

    def func(*args, **kw):
        seen.append(kw)
        return host.attention_pytorch(*args, **{n: a for n, a in kw.items() if n != "var_length"})
    if case == "extra":
        kwargs["var_length"] = None
    override = octet_attention.Int8Attention()
    with caplog.at_level(logging.INFO, logger="octet"):
        for _ in range(2):
            out = override(func, q, k, v, 2, **kwargs)
    assert kernel_calls == [] and len(seen) == 2
    torch.testing.assert_close(out, host.attention_pytorch(q, k, v, 2, **{n: a for n, a in kwargs.items()
                                                                         if n != "var_length"}), rtol=0, atol=0)
    assert sum(reason in r.getMessage() for r in caplog.records) == 1, caplog.text


def test_install_clones_and_keeps_another_packs_override(tiny_model):
    clone, installed = octet_attention.install(tiny_model)
    assert installed and isinstance(clone.model_options["transformer_options"][octet_attention.OPTION],
                                    octet_attention.Int8Attention)
    assert octet_attention.OPTION not in tiny_model.model_options.get("transformer_options", {})
    other = tiny_model.clone()
    other.model_options.setdefault("transformer_options", {})[octet_attention.OPTION] = lambda f, *a, **k: f(*a, **k)
    kept, installed = octet_attention.install(other)
    assert not installed and not isinstance(kept.model_options["transformer_options"][octet_attention.OPTION],
                                            octet_attention.Int8Attention)


def test_the_node_reports_what_it_did(tiny_model):
    from comfyui_octet.nodes.attention_nodes import Int8AttentionNode
    out = Int8AttentionNode.execute(tiny_model, True)
    assert "on (q·kᵀ in int8, k smoothed)" in out.result[1]
    assert isinstance(out.result[0].model_options["transformer_options"][octet_attention.OPTION],
                      octet_attention.Int8Attention)


def test_a_traced_attention_has_no_graph_break(host):
    """Under torch.compile (the host's TorchCompileModel) the override traces to the octet::attention_int8 op."""
    q, k, v = _qkv()
    to = {octet_attention.OPTION: octet_attention.Int8Attention()}

    class Call(torch.nn.Module):
        def forward(self, q):
            return host.attention_pytorch(q, k, v, 2, transformer_options=to)
    with torch.no_grad():
        assert_compiles_as_eager(Call(), q)
