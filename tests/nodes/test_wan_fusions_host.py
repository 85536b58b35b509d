"""Wan's fusions on the real host's blocks. Its self-attention prepares q and k in one kernel each (octet/deferred.py
WanQKForward, kernels/backends/triton_rope.py row_norm_rope): the host's output up to the kernel's last-bit
differences from torch's RMSNorm, the kernel run once for q and once for k; the host's own forward (exactly its
numbers) under an attn1 patch, autograd, the switch, or a host whose code differs. Its FFN input's LayerNorm and
modulation run inside the FFN's INT8 quantization, the FFN's GELU in its first layer's GEMM epilogue, the block's
gated residual in its second's."""
import pytest
import torch

from comfyui_octet import octet
from comfyui_octet.kernels.backends import triton_rope, triton_support
from comfyui_octet.octet import deferred, host_code
from compile_checks import assert_compiles_as_eager

pytestmark = pytest.mark.skipif(triton_support.unavailable_reason() is not None or not triton_support.interpreting(),
                                reason="needs Triton (TRITON_INTERPRET=1 on CPU)")


@pytest.fixture
def kernel_calls(monkeypatch):
    calls = []
    real = triton_rope.row_norm_rope

    def counted(x, weight, eps, freqs, heads, config=None):
        calls.append(tuple(x.shape))
        return real(x, weight, eps, freqs, heads, config)
    monkeypatch.setattr(triton_rope, "row_norm_rope", counted)
    return calls


def attention(dim=64, heads=2, tokens=6, seed=0):
    import comfy.ops
    from comfy.ldm.flux.math import rope
    from comfy.ldm.wan.model import WanSelfAttention
    torch.manual_seed(seed)
    m = WanSelfAttention(dim, heads, qk_norm=True, eps=1e-6,
                         operation_settings={"operations": comfy.ops.disable_weight_init}).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.dim() == 1 else 0.0))
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(2, tokens, dim, generator=g)
    pos = torch.arange(tokens, dtype=torch.float32).reshape(1, tokens) * 1.3
    freqs = rope(pos, dim // heads, 10000).unsqueeze(2)          # Wan's layout [1, L, 1, D/2, 2, 2]
    return m, x, freqs


def close(out, ref):
    """fp32: the kernel's row sum and rsqrt against torch's, a few steps of 2**-23 at the values' scale."""
    err = (out - ref).abs().max() / ref.abs().max()
    return err < 1e-5


def test_wan_self_attention_prepares_q_and_k_in_the_kernel(kernel_calls):
    m, x, freqs = attention()
    with torch.no_grad():
        host = m(x, freqs)
    assert deferred.install_qk(m) == [""]
    assert isinstance(m.forward, deferred.WanQKForward)
    with torch.no_grad():
        out = m(x, freqs)
    assert kernel_calls == [(2, 6, 64), (2, 6, 64)]
    assert close(out, host), (out - host).abs().max()
    # Not a no-op: without the RoPE (freqs of the identity) the output differs.
    ident = torch.zeros_like(freqs)
    ident[..., 0, 0] = ident[..., 1, 1] = 1.0
    with torch.no_grad():
        assert not close(m(x, ident), host)


def test_what_the_kernel_must_not_take_runs_the_hosts_forward(kernel_calls, monkeypatch):
    m, x, freqs = attention()
    deferred.install_qk(m)
    with torch.no_grad():
        host = type(m).forward(m, x, freqs)
        # An attn1 patch (0.29) sees the host's q and k.
        seen = []
        to = {"patches": {"attn1_patch": [lambda d: seen.append(d["q"].shape) or d["x"]]}}
        import comfy.ldm.wan.model as wan
        patched = m(x, freqs, transformer_options=to)
        if "attn1_patch" in open(wan.__file__).read():
            assert seen == [(2, 6, 2, 32)]
        assert kernel_calls == [] and torch.equal(patched, host)
        # The switch.
        monkeypatch.setenv("OCTET_DEFERRED", "0")
        assert torch.equal(m(x, freqs), host) and kernel_calls == []
        monkeypatch.setenv("OCTET_DEFERRED", "1")
        # Heads the kernel cannot read (48 wide, not a power of two): the host's ops for q and k, exactly.
        m48, x48, f48 = attention(dim=96, heads=2)
        assert deferred.install_qk(m48) == [""]
        assert torch.equal(m48(x48, f48), type(m48).forward(m48, x48, f48)) and kernel_calls == []
    # A hook on a norm runs: that tensor takes the host's ops (the other one the kernel).
    m.norm_k.register_forward_hook(lambda mod, i, o: o * 2)
    with torch.no_grad():
        hooked = m(x, freqs)
        host_hooked = type(m).forward(m, x, freqs)
    assert kernel_calls == [(2, 6, 64)] and close(hooked, host_hooked) and not close(hooked, host)
    kernel_calls.clear()
    # Autograd (QAT trains through blocks): the kernel has no backward.
    xg = x.clone().requires_grad_(True)
    out = m(xg, freqs)
    assert out.requires_grad and kernel_calls == []


def test_another_hosts_wan_code_keeps_the_hosts_forward(monkeypatch):
    m, _, _ = attention()
    monkeypatch.setattr(host_code, "_checked", {})
    monkeypatch.setitem(deferred.WAN_SOURCES, "apply_rope1", {"0" * 16})
    assert deferred.install_qk(m) == []


def test_quantize_installs_it_for_an_int8_wan():
    """Quantize Model on a (small) Wan 2.1 block stack: the self-attentions are q/k-prep sites, the output stays
    the host-prepared model's up to last-bit differences carried through the INT8 layers."""
    import comfy.ops
    from comfy.ldm.wan.model import WanModel
    torch.manual_seed(0)
    model = WanModel(model_type="t2v", patch_size=(1, 2, 2), text_len=8, in_dim=16, dim=64, ffn_dim=128,
                     freq_dim=32, text_dim=32, out_dim=16, num_heads=2, num_layers=2, qk_norm=True,
                     cross_attn_norm=True, eps=1e-6, operations=comfy.ops.disable_weight_init).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if p.dim() == 1 and p.numel() == 64 else 0.0))
    result = octet.quantize_(model, octet.DynamicW8A8Config())
    assert [n for n in result.qk_norms if n.endswith("self_attn")] == ["blocks.0.self_attn", "blocks.1.self_attn"]
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 16, 2, 8, 8, generator=g)
    t = torch.tensor([500.0])
    ctx = torch.randn(1, 8, 32, generator=g)
    with torch.no_grad():
        fused = model(x, t, ctx)
        for name in ("blocks.0.self_attn", "blocks.1.self_attn"):
            del model.get_submodule(name).forward
        host = model(x, t, ctx)
    torch.testing.assert_close(fused, host, rtol=0, atol=2e-3 * float(host.abs().max()))


def test_wan_blocks_ffn_input_is_normalised_and_modulated_inside_its_int8_quantization(monkeypatch):
    """Wan's ``ffn(addcmul(shift, norm2(x), 1 + scale))``: norm2's output stays pending through the addcmul and
    the FFN's first INT8 layer computes both while quantizing (octet/deferred.py PendingNorm), as for Flux and
    SD3, with the GELU in its GEMM's epilogue; the block's ``addcmul(x, ffn(...), e5)`` runs in the second layer's
    epilogue (PendingOutput). The block's output is the one with the float passes up to int8 rounding flips of
    that layer's input."""
    import comfy.ops
    from comfy.ldm.flux.math import rope
    from comfy.ldm.wan.model import WanAttentionBlock
    torch.manual_seed(0)
    block = WanAttentionBlock("t2v_cross_attn", 64, 128, 2, qk_norm=True, cross_attn_norm=True, eps=1e-6,
                              operation_settings={"operations": comfy.ops.disable_weight_init}).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if p.dim() == 1 and p.numel() == 64 else 0.0))
    # Triton (the interpreter here): the CPU backend takes no deferred input.
    result = octet.quantize_(block, octet.DynamicW8A8Config(backend="triton"))
    assert result.norms == ["norm2"] and result.qk_norms == ["self_attn"]
    assert result.chains == ["ffn"]       # and the FFN's GELU in that layer's GEMM epilogue (octet/fusion.py)
    fed, gelu_gemms = [], []
    real_feed = deferred.PendingNorm.feed
    monkeypatch.setattr(deferred.PendingNorm, "feed", lambda self, *a: fed.append(1) or real_feed(self, *a))
    from comfyui_octet.kernels.backends import triton_gemm
    real_run, real_residual = triton_gemm.W8A8Gemm.run, triton_gemm.W8A8Gemm.run_residual
    monkeypatch.setattr(triton_gemm.W8A8Gemm, "run",
                        lambda self, *a, **k: (self.gelu and gelu_gemms.append(1)) or real_run(self, *a, **k))
    residuals = []
    monkeypatch.setattr(triton_gemm.W8A8Gemm, "run_residual",
                        lambda self, *a, **k: residuals.append(1) or real_residual(self, *a, **k))
    g = torch.Generator().manual_seed(3)
    x, ctx = torch.randn(1, 6, 64, generator=g), torch.randn(1, 5, 64, generator=g)
    e = torch.randn(1, 6, 64, generator=g) * 0.1
    freqs = rope(torch.arange(6, dtype=torch.float32).reshape(1, 6), 32, 10000).unsqueeze(2)
    with torch.no_grad():
        block(x, e, freqs, ctx)                            # plans made at these shapes
        fused = block(x, e, freqs, ctx)
        # per call: the FFN's GELU in ffn.0's epilogue, the gated residual in ffn.2's
        assert len(fed) == 2 and len(gelu_gemms) == 2 and len(residuals) == 2
        monkeypatch.setenv("OCTET_DEFERRED", "0")
        monkeypatch.setenv("OCTET_FUSED_MLP", "0")
        host = block(x, e, freqs, ctx)
        assert len(gelu_gemms) == 2 and len(residuals) == 2
    torch.testing.assert_close(fused, host, rtol=0, atol=2e-3 * float(host.abs().max()))


def _block(seed=0):
    import comfy.ops
    from comfy.ldm.wan.model import WanAttentionBlock
    torch.manual_seed(seed)
    block = WanAttentionBlock("t2v_cross_attn", 64, 128, 2, qk_norm=True, cross_attn_norm=True, eps=1e-6,
                              operation_settings={"operations": comfy.ops.disable_weight_init}).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if p.dim() == 1 and p.numel() == 64 else 0.0))
    return block


def _inputs(tokens=6, seed=3):
    from comfy.ldm.flux.math import rope
    g = torch.Generator().manual_seed(seed)
    x, ctx = torch.randn(1, tokens, 64, generator=g), torch.randn(1, 5, 64, generator=g)
    e = torch.randn(1, 6, 64, generator=g) * 0.1
    freqs = rope(torch.arange(tokens, dtype=torch.float32).reshape(1, tokens), 32, 10000).unsqueeze(2)
    return x, e, freqs, ctx


@pytest.mark.parametrize("quantized", [False, True])
def test_wan_blocks_self_attention_input_is_one_norm_and_modulation_pass(quantized, monkeypatch, caplog):
    """Wan's ``self_attn(addcmul(e0, norm1(x), 1 + e1))``: norm1's output stays pending through the addcmul and the
    self-attention computes it in one kernel pass (octet/float_fusions.py NormModulateForward), for a bf16 model
    (float_fusions.install) and an INT8 one (Quantize Model); the block's output is the host ops' up to their
    roundings, and nothing logs a deferred input computed in float."""
    import logging
    from comfyui_octet.kernels import registry
    from comfyui_octet.kernels.backends import triton_layernorm
    from comfyui_octet.octet import float_fusions
    monkeypatch.setenv("OCTET_FLOAT_FUSIONS", "1")     # off by default under the interpreter (float_fusions.py)
    block = _block()
    if quantized:
        result = octet.quantize_(block, octet.DynamicW8A8Config(backend="triton"))
        assert "norm1" in result.float_fusions
        assert "1 LayerNorms fused with their modulation" in result.summary()
    else:
        assert float_fusions.install(block) == ["norm1"]
        deferred.install_qk(block)
    calls = []
    real = triton_layernorm.NormModulate.__call__
    monkeypatch.setattr(triton_layernorm.NormModulate, "__call__",
                        lambda self, x, eps, mult=None, shift=None: calls.append((mult is None, shift is None))
                        or real(self, x, eps, mult, shift))
    x, e, freqs, ctx = _inputs()
    registry._logged.difference_update({k for k in registry._logged if k.startswith("deferred:")})
    with torch.no_grad(), caplog.at_level(logging.INFO, logger="octet"):
        fused = block(x, e, freqs, ctx)
        assert calls == [(False, False)]      # once, with the block's modulation joined
        monkeypatch.setenv("OCTET_FLOAT_FUSIONS", "0")
        host = block(x, e, freqs, ctx)
    assert len(calls) == 1
    assert not any("computed in float" in r.getMessage() for r in caplog.records)
    torch.testing.assert_close(fused, host, rtol=0, atol=(2e-3 if quantized else 1e-5) * float(host.abs().max()))


def test_a_pending_norm1_read_by_anything_else_is_the_modulated_norm(rng):
    """Whatever reads the pending norm (a host patch between norm1 and the self-attention, the self-attention's own
    forward with the switch off): the same values as the host's LayerNorm then addcmul, up to fp32 rounding."""
    from comfyui_octet.kernels.backends import triton_layernorm
    x = torch.randn(2, 7, 64, generator=rng) * 2
    mod = torch.randn(2, 6, 64, generator=rng) * 0.1
    p = deferred.PendingNorm(x, 1e-6, kernel=triton_layernorm.NormModulate())
    joined = torch.addcmul(mod[:, 0:1], p, 1 + mod[:, 1:2])
    assert type(joined) is deferred.PendingNorm and joined.kernel is p.kernel
    host = torch.addcmul(mod[:, 0:1], torch.nn.functional.layer_norm(x, (64,), None, None, 1e-6), 1 + mod[:, 1:2])
    torch.testing.assert_close(joined * 1.0, host, rtol=1e-5, atol=1e-5)


def test_an_int8_wan_block_computes_the_same_under_inference_mode(monkeypatch):
    """ComfyUI samples under torch.inference_mode: the pending tensors (norm1's, norm2's, the FFN's output) are made
    and absorbed there as under no_grad, to the same bits."""
    monkeypatch.setenv("OCTET_FLOAT_FUSIONS", "1")
    block = _block()
    octet.quantize_(block, octet.DynamicW8A8Config(backend="triton"))
    x, e, freqs, ctx = _inputs()
    with torch.no_grad():
        expected = block(x, e, freqs, ctx)
    with torch.inference_mode():
        got = block(x, e, freqs, ctx)
    assert torch.equal(got, expected)


def test_an_int8_wan_block_compiles_without_graph_breaks(monkeypatch):
    """Under torch.compile (the host's TorchCompileModel) the patched norm1, the FFN's chain and the self-attention
    trace as the host's code around the INT8 layers' custom ops: no graph break, and the eager output up to the
    last bits (eager, norm1 + modulation is the fused kernel's one rounding; traced, the host's two)."""
    import comfy.ldm.modules.attention as attention
    import comfy.ldm.wan.model as wan
    # The host's CPU attention (sub-quadratic) asks psutil for free memory, which no trace can follow: PyTorch's SDPA,
    # the attention the host picks on a GPU, keeps the check to Octet's parts.
    monkeypatch.setattr(wan, "optimized_attention", attention.attention_pytorch)
    monkeypatch.setenv("OCTET_FLOAT_FUSIONS", "1")
    block = _block()
    octet.quantize_(block, octet.DynamicW8A8Config())
    x, e, freqs, ctx = _inputs()

    class Call(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.block = block

        def forward(self, x):
            return self.block(x, e, freqs, ctx)
    with torch.no_grad():
        assert_compiles_as_eager(Call(), x, rtol=1e-5, atol=1e-5)
