"""A UNet's transformer stacks without the host's per-call bookkeeping (octet/lean_blocks.py), on the real host's
SpatialTransformer: the host's numbers bit for bit with the lean path taken (the host's block and attention forwards
are not called), and the host's own forward wherever the lean one must not run: attention patches, autograd, a
host whose block code differs, the switch. Hooks and other attention functions run as the host runs them."""
import logging

import pytest
import torch

from comfyui_octet import octet
from comfyui_octet.fixtures import reference_model as rm
from comfyui_octet.octet import host_code, lean_blocks


@pytest.fixture
def attention():
    import comfy.ldm.modules.attention as A
    assert lean_blocks.host_known(A), lean_blocks.host_sources(A)
    return A


@pytest.fixture
def pytorch_attention(attention, monkeypatch):
    """The host's attention on CUDA (on a CPU it picks split / sub-quadratic attention)."""
    monkeypatch.setattr(attention, "optimized_attention", attention.attention_pytorch)
    return attention


@pytest.fixture
def host_calls(attention, monkeypatch):
    """Counts calls of the host's BasicTransformerBlock and CrossAttention forwards (the lean path makes none)."""
    calls = {"block": 0, "attention": 0}
    real_block, real_attn = attention.BasicTransformerBlock.forward, attention.CrossAttention.forward

    def block(self, *a, **k):
        calls["block"] += 1
        return real_block(self, *a, **k)

    def attn(self, *a, **k):
        calls["attention"] += 1
        return real_attn(self, *a, **k)
    monkeypatch.setattr(attention.BasicTransformerBlock, "forward", block)
    monkeypatch.setattr(attention.CrossAttention, "forward", attn)
    return calls


def stack(use_linear=True, depth=2, seed=0):
    import comfy.ops
    from comfy.ldm.modules.attention import SpatialTransformer
    torch.manual_seed(seed)
    st = SpatialTransformer(32, 2, 16, depth=depth, context_dim=24, use_linear=use_linear,
                            operations=comfy.ops.disable_weight_init).eval()
    with torch.no_grad():
        for p in st.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    g = torch.Generator().manual_seed(seed + 1)
    return st, torch.randn(2, 32, 4, 6, generator=g), torch.randn(2, 5, 24, generator=g)


def options():
    return {"block": ("input", 4), "cond_or_uncond": [1, 0], "sigmas": torch.ones(2)}


@pytest.mark.parametrize("use_linear", [True, False])      # SDXL's linear projections, SD1.5's 1x1 convs
def test_lean_stack_gives_the_hosts_numbers_bit_for_bit(pytorch_attention, host_calls, use_linear):
    st, x, ctx = stack(use_linear)
    with torch.inference_mode():
        host = st(x, context=ctx, transformer_options=options())
        calls = dict(host_calls)
        assert lean_blocks.install(st) == [""]
        to = options()
        lean = st(x, context=ctx, transformer_options=to)
    assert calls == {"block": 2, "attention": 4}
    assert host_calls == calls                 # the lean path ran: no host block or attention forward called
    assert torch.equal(lean, host)
    assert to["block_index"] == 1 and to["activations_shape"] == [2, 32, 4, 6]   # set as the host sets them


def test_other_attention_functions_and_overrides_are_called_as_the_host_calls_them(attention, host_calls,
                                                                                     monkeypatch):
    st, x, ctx = stack()
    seen = []
    real = attention.attention_basic

    def basic(q, k, v, heads, **kw):
        seen.append(heads)
        return real(q, k, v, heads, **kw)
    monkeypatch.setattr(attention, "optimized_attention", basic)
    with torch.inference_mode():
        host = st(x, context=ctx, transformer_options=options())
        lean_blocks.install(st)
        lean = st(x, context=ctx, transformer_options=options())
        assert seen == [2] * 8 and host_calls["block"] == 2 and torch.equal(lean, host)
        # An attention override (0.29's optimized_attention_override) gets the host's function, as wrap_attn does.
        monkeypatch.setattr(attention, "optimized_attention", attention.attention_pytorch)
        overridden = []
        to = dict(options(), optimized_attention_override=lambda fn, *a, **k: overridden.append(fn) or fn(*a, **k))
        out = st(x, context=ctx, transformer_options=to)
        assert len(overridden) == 4 and all(inspect_name(f) == "attention_pytorch" for f in overridden)
        assert torch.equal(out, type(st).forward(st, x, context=ctx, transformer_options=dict(to)))
    assert len(overridden) == 8


def inspect_name(fn):
    import inspect
    return inspect.unwrap(fn).__name__


def test_attention_patches_autograd_and_global_hooks_run_the_hosts_forward(pytorch_attention, host_calls,
                                                                          monkeypatch):
    st, x, ctx = stack()
    lean_blocks.install(st)

    def scale_n(n, context, value, extra):
        return n * 1.5, context, value
    patched = dict(options(), patches={"attn1_patch": [scale_n]})
    replaced = dict(options(), patches_replace={"attn2": {("input", 4): lambda q, k, v, extra: q}})
    with torch.inference_mode():
        with_patch = st(x, context=ctx, transformer_options=patched)
        assert host_calls["block"] == 2
        with_replace = st(x, context=ctx, transformer_options=replaced)
        assert host_calls["block"] == 4
        plain = st(x, context=ctx, transformer_options=options())
        assert host_calls["block"] == 4
        del st.forward
        assert torch.equal(with_patch, st(x, context=ctx, transformer_options=dict(patched)))
        assert torch.equal(with_replace, st(x, context=ctx, transformer_options=dict(replaced)))
        assert not torch.equal(with_patch, plain) and not torch.equal(with_replace, plain)
    lean_blocks.install(st)
    calls = host_calls["block"]
    out = st(x, context=ctx, transformer_options=options())         # grad enabled: QAT trains through blocks
    assert host_calls["block"] == calls + 2 and torch.equal(out.detach(), plain)
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: None)
    try:
        with torch.inference_mode():
            st(x, context=ctx, transformer_options=options())
        assert host_calls["block"] == calls + 4
    finally:
        handle.remove()


def test_a_submodules_hook_still_runs(pytorch_attention, host_calls):
    st, x, ctx = stack()
    to_q = st.transformer_blocks[0].attn1.to_q
    to_q.register_forward_hook(lambda m, i, o: o + 1.0)
    with torch.inference_mode():
        host = st(x, context=ctx, transformer_options=options())
        lean_blocks.install(st)
        lean = st(x, context=ctx, transformer_options=options())
    assert host_calls["block"] == 2 and torch.equal(lean, host)


def test_another_hosts_block_code_keeps_the_hosts_forwards(attention, monkeypatch, caplog):
    st, x, ctx = stack()
    monkeypatch.setattr(host_code, "_checked", {})
    monkeypatch.setitem(lean_blocks.KNOWN_SOURCES, "BasicTransformerBlock.forward", {"0" * 16})
    from comfyui_octet.kernels import registry
    monkeypatch.setattr(registry, "_logged", set(), raising=False)
    with caplog.at_level(logging.INFO, logger="octet"):
        assert lean_blocks.install(st) == []
    assert "BasicTransformerBlock.forward differ" in caplog.text
    monkeypatch.setattr(host_code, "_checked", {})
    monkeypatch.undo()
    monkeypatch.setenv("OCTET_LEAN_BLOCKS", "0")
    assert lean_blocks.install(st) == []


def test_quantized_unet_runs_its_stacks_lean_with_the_same_numbers(pytorch_attention, host_calls, monkeypatch):
    """quantize_ (dynamic W8A8 on the reference UNet's architecture) installs the lean stacks; the INT8 layers,
    their shared q/k/v GEMMs and the deferred forwards inside give the same output as without them."""
    torch.manual_seed(0)
    base = rm.build_diffusion_model("unet").eval()
    names = sorted(n for n, m in base.named_modules() if type(m).__name__ == "SpatialTransformer")
    assert names
    size = rm.spec("unet").latent_size
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, size, size, generator=g)
    ctx = torch.randn(2, 8, base.input_blocks[1][1].transformer_blocks[0].attn2.to_k.in_features, generator=g)
    t = torch.tensor([500.0, 500.0])
    quantized_lean_and_not(base, names, lambda m: m(x, t, context=ctx), lambda: host_calls["block"], monkeypatch)


def quantized_lean_and_not(base, names, run, host_count, monkeypatch):
    """``base`` quantized (dynamic W8A8) with the lean forwards off and on: the lean sites are ``names``, the lean
    model calls none of the host's code ``host_count`` counts, and both give the same output bit for bit."""
    import copy
    outs = {}
    for switch in ("0", "1"):
        monkeypatch.setenv("OCTET_LEAN_BLOCKS", switch)
        model = copy.deepcopy(base)
        result = octet.quantize_(model, octet.DynamicW8A8Config())
        assert result.lean_blocks == (names if switch == "1" else [])
        with torch.inference_mode():
            run(model)                                    # plans made
            before = host_count()
            outs[switch] = run(model)
        assert (host_count() == before) == (switch == "1")
    assert torch.equal(outs["0"], outs["1"])


def test_quantize_model_node_patches_the_stacks_forwards(monkeypatch):
    from comfyui_octet.nodes import bridge
    patcher = rm.load_reference("unet")
    clone, result = bridge.quantize_model(patcher, octet.DynamicW8A8Config())
    lean = {k for k, v in clone.object_patches.items() if isinstance(v, lean_blocks.FORWARDS)}
    assert result.lean_blocks and lean == {f"diffusion_model.{n}.forward" for n in result.lean_blocks}
    assert "transformer stacks run lean" in result.summary()


@pytest.fixture
def mmdit(attention, monkeypatch):
    """SD3's mmdit module with the host's CUDA attention, and a count of its _block_mixing calls (the lean joint
    block makes none)."""
    import comfy.ldm.modules.diffusionmodules.mmdit as M
    assert lean_blocks.mmdit_known(M), lean_blocks.mmdit_sources(M)
    monkeypatch.setattr(M, "optimized_attention", attention.attention_pytorch)
    calls = []
    real = M._block_mixing
    monkeypatch.setattr(M, "_block_mixing", lambda *a, **k: calls.append(1) or real(*a, **k))
    M.host_calls = calls
    return M


def joint_block(mmdit, pre_only=False, x_block_self_attn=False, seed=0):
    import comfy.ops
    torch.manual_seed(seed)
    jb = mmdit.JointBlock(64, 2, mlp_ratio=4.0, qkv_bias=True, attn_mode="torch", pre_only=pre_only, rmsnorm=False,
                          scale_mod_only=False, swiglu=False, qk_norm="rms", x_block_self_attn=x_block_self_attn,
                          dtype=None, device=None, operations=comfy.ops.disable_weight_init).eval()
    with torch.no_grad():
        for p in jb.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    g = torch.Generator().manual_seed(seed + 1)
    return jb, torch.randn(2, 5, 64, generator=g), torch.randn(2, 12, 64, generator=g), torch.randn(2, 64, generator=g)


@pytest.mark.parametrize("pre_only, x_self", [(False, False), (False, True), (True, False)])
def test_lean_joint_block_gives_the_hosts_numbers_bit_for_bit(mmdit, pre_only, x_self, monkeypatch):
    """SD3's joint block: the context and image streams' pre-attention, the joint attention, the post-attention
    (SD3.5's extra image self-attention, the last block's context-only pre-attention). With OCTET_DEFERRED=0 the
    q/k/v preparation is the host's split, QK norms and cats too (next test: the kernel's)."""
    monkeypatch.setenv("OCTET_DEFERRED", "0")
    jb, ctx, x, c = joint_block(mmdit, pre_only, x_self)
    with torch.inference_mode():
        host = jb(ctx, x, c=c, use_checkpoint=False, transformer_options={})
        assert len(mmdit.host_calls) == 1
        assert lean_blocks.install(jb) == [""]
        lean = jb(ctx, x, c=c, use_checkpoint=False, transformer_options={})
        assert len(mmdit.host_calls) == 1                      # the lean path ran
        checkpointed = jb(ctx, x, c=c, transformer_options={})    # a replace patch's call (use_checkpoint default)
        assert len(mmdit.host_calls) == 2
    for a, b in zip(lean, host):
        assert (a is None and b is None) if pre_only and a is None else torch.equal(a, b)
    assert torch.equal(checkpointed[1], host[1])


@pytest.mark.parametrize("pre_only, x_self", [(False, False), (False, True), (True, False)])
def test_lean_joint_block_prepares_q_k_v_in_one_kernel_per_stream(mmdit, pre_only, x_self, monkeypatch):
    """Where the kernels run (here the CPU interpreter), the joint attention's q, k, v (and the image self-attention's
    q, k) come from triton_rope.QKVHeads, one launch per stream: the host's QK norms never run, and the block's
    outputs match the host's up to the norms' last bits; a LayerNorm QK norm (not the kernel's) runs the host's."""
    from comfyui_octet.kernels.backends import triton_support
    if not triton_support.interpreting() or triton_support.unavailable_reason() is not None:
        pytest.skip("the q/k/v kernel on CPU: Triton's interpreter (TRITON_INTERPRET=1)")
    import comfy.ldm.common_dit as common_dit
    norms = []
    real_norm = common_dit.rms_norm
    monkeypatch.setattr(common_dit, "rms_norm", lambda *a, **k: norms.append(1) or real_norm(*a, **k))
    jb, ctx, x, c = joint_block(mmdit, pre_only, x_self)
    with torch.inference_mode():
        host = jb(ctx, x, c=c, use_checkpoint=False, transformer_options={})
        host_norms = len(norms)
        assert host_norms == 4 + 2 * x_self
        lean_blocks.install(jb)
        lean = jb(ctx, x, c=c, use_checkpoint=False, transformer_options={})
        assert len(mmdit.host_calls) == 1 and len(norms) == host_norms      # lean, and no host QK norm ran
        prep = jb.forward._qkv
        assert sum(callable(v) or v is False for v in prep._calls.values()) == 1
    for a, b in zip(lean, host):
        if a is None:
            assert pre_only and b is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # The gated residuals as one addcmul each (gate_cat's as two): the host's products and sums never run.
    adds = []
    real_mul = torch.Tensor.__mul__
    monkeypatch.setattr(torch.Tensor, "__mul__", lambda a, b: adds.append(1) or real_mul(a, b))
    with torch.inference_mode():
        jb(ctx, x, c=c, use_checkpoint=False, transformer_options={})
    assert adds == []
    monkeypatch.setattr(torch.Tensor, "__mul__", real_mul)
    # A host module the kernel does not stand for: ln_q as a LayerNorm is called as the host calls it.
    jb.context_block.attn.ln_q = torch.nn.LayerNorm(32, eps=1e-6)
    with torch.inference_mode():
        before = len(norms)
        jb(ctx, x, c=c, use_checkpoint=False, transformer_options={})
    # The context stream's ln_k and the image stream's two: the joint attention's preparation is the host's; the
    # image self-attention's (x_self) still the kernel's.
    assert len(norms) - before == 3


def test_joint_blocks_compute_the_modulations_silu_once_per_conditioning_vector(mmdit, monkeypatch):
    """Every joint block of a step modulates from SiLU(c) of the same c: the lean blocks compute it once (bit for bit
    the host's numbers), again for another c or after an in-place write to it."""
    monkeypatch.setenv("OCTET_DEFERRED", "0")
    blocks = [joint_block(mmdit, seed=s) for s in (0, 1)]
    (jb0, ctx, x, c), (jb1, _, _, _) = blocks
    with torch.no_grad():
        host = jb1(*jb0(ctx, x, c=c, use_checkpoint=False, transformer_options={}), c=c, use_checkpoint=False,
                   transformer_options={})
        for jb in (jb0, jb1):
            lean_blocks.install(jb)
        silu = []
        real = torch.nn.SiLU.forward
        monkeypatch.setattr(torch.nn.SiLU, "forward", lambda self, t: silu.append(t) or real(self, t))
        lean = jb1(*jb0(ctx, x, c=c, use_checkpoint=False, transformer_options={}), c=c, use_checkpoint=False,
                   transformer_options={})
        assert len(silu) == 1 and all(torch.equal(a, b) for a, b in zip(lean, host))
        c2 = c.clone()
        jb0(ctx, x, c=c2, use_checkpoint=False, transformer_options={})
        jb1(ctx, x, c=c2, use_checkpoint=False, transformer_options={})
        assert len(silu) == 2
        c2.mul_(2)                                   # written in place: its SiLU computed again
        again = jb0(ctx, x, c=c2, use_checkpoint=False, transformer_options={})
        assert len(silu) == 3
        assert torch.equal(again[1], type(jb0).forward(jb0, ctx, x, c=c2, use_checkpoint=False,
                                                       transformer_options={})[1])


def test_a_patched_part_of_the_joint_block_runs_the_hosts_forward(mmdit):
    jb, ctx, x, c = joint_block(mmdit)
    lean_blocks.install(jb)
    jb.x_block.pre_attention = lambda *a, **k: type(jb.x_block).pre_attention(jb.x_block, *a, **k)
    with torch.inference_mode():
        jb(ctx, x, c=c, use_checkpoint=False, transformer_options={})
    assert len(mmdit.host_calls) == 1


def test_quantized_mmdit_runs_its_joint_blocks_lean_with_the_same_numbers(mmdit, monkeypatch):
    """Bit for bit with the q/k/v kernel and the fused gated residuals off (OCTET_DEFERRED=0); the previous tests
    check them within float rounding."""
    monkeypatch.setenv("OCTET_DEFERRED", "0")
    torch.manual_seed(0)
    base = rm.build_diffusion_model("mmdit").eval()
    names = sorted(n for n, m in base.named_modules() if type(m).__name__ == "JointBlock")
    assert len(names) == 4
    g = torch.Generator().manual_seed(3)
    size = rm.spec("mmdit").latent_size
    x = torch.randn(2, 16, size, size, generator=g)
    ctx = torch.randn(2, 4, rm.COND_DIM, generator=g)
    y = torch.randn(2, rm.COND_DIM, generator=g)
    t = torch.tensor([0.5, 0.5])
    quantized_lean_and_not(base, names, lambda m: m(x, t, context=ctx, y=y), lambda: len(mmdit.host_calls),
                           monkeypatch)


def joint_block_plain():
    import comfy.ldm.modules.diffusionmodules.mmdit as M
    import comfy.ops
    return M.JointBlock(64, 2, mlp_ratio=4.0, qkv_bias=True, attn_mode="torch", pre_only=False, rmsnorm=False,
                        scale_mod_only=False, swiglu=False, qk_norm="rms", x_block_self_attn=False, dtype=None,
                        device=None, operations=comfy.ops.disable_weight_init).eval()


def test_attention_op_switch_makes_the_lean_forwards_call_pytorchs_op_or_the_hosts_sdpa(monkeypatch, caplog):
    """A UNet's lean stacks call PyTorch's flash attention op directly, SD3's joint blocks the host's SDPA;
    OCTET_ATTENTION_OP (sdpa | flash | cudnn, read when the lean forwards are made) overrides both. An op that
    refuses its inputs answers None from then on (the host's SDPA runs), said once. On a GPU the op's output
    matches SDPA's within bf16 rounding."""
    st, x, ctx = stack()
    monkeypatch.delenv("OCTET_ATTENTION_OP", raising=False)
    assert lean_blocks.install(st) and st.forward.sdpa.name == "flash"     # a UNet's stacks: flash's op
    jb = joint_block_plain()
    lean_blocks.install(jb)
    assert jb.forward.sdpa is None                                       # SD3's joint blocks: the host's SDPA
    monkeypatch.setenv("OCTET_ATTENTION_OP", "sdpa")
    st1, _, _ = stack()
    lean_blocks.install(st1)
    assert st1.forward.sdpa is None
    monkeypatch.setenv("OCTET_ATTENTION_OP", "cudnn")
    st2, _, _ = stack()
    lean_blocks.install(st2)
    op = st2.forward.sdpa
    assert isinstance(op, lean_blocks._AttentionOp) and op.name == "cudnn"
    q, k, v = (torch.randn(1, 2, 8, 16) for _ in range(3))
    with caplog.at_level(logging.INFO, logger="octet"):
        assert op(q, k, v) is None and op(q, k, v) is None          # no cuDNN on a CPU
    assert op.run is None
    if torch.cuda.is_available():
        for name in ("flash", "cudnn"):
            qc, kc, vc = (t.cuda().to(torch.bfloat16) for t in (q, k, v))
            out = lean_blocks._AttentionOp(name)(qc, kc, vc)
            ref = torch.nn.functional.scaled_dot_product_attention(qc, kc, vc)
            torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
