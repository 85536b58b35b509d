"""A UNet's GroupNorm (+ SiLU) and GEGLU gate through fused kernels on the real host's blocks: a ResBlock (its
in_layers and out_layers Sequentials, and an up/down block that slices them) and a SpatialTransformer (its
norm, its feed-forward's GEGLU) give the host's numbers with the kernels in place; lowvram casting, weight
patches, autograd and the switch take the host's forward; Quantize Model installs them as graph-safe object
patches for a UNet.

The CPU interpreter runs a GroupNorm in about a second, so the fused paths are on here only where a test sets
OCTET_FLOAT_FUSIONS=1 (octet/float_fusions.py); the whole-model tests of other files run the host's ops."""
import pytest
import torch

from comfyui_octet.fixtures import reference_model as rm
from comfyui_octet.kernels.backends import triton_support
from comfyui_octet.nodes import bridge
from comfyui_octet.octet import DynamicW8A8Config, float_fusions

pytestmark = pytest.mark.skipif(triton_support.unavailable_reason() is not None or not triton_support.interpreting(),
                                reason="needs Triton (TRITON_INTERPRET=1 on CPU)")


@pytest.fixture
def kernel_calls(monkeypatch):
    """Turns the fused paths on and records each kernel call: the GroupNorm's silu flag, or "geglu"."""
    from comfyui_octet.kernels.backends import triton_geglu, triton_groupnorm
    monkeypatch.setenv("OCTET_FLOAT_FUSIONS", "1")
    calls = []
    real_norm, real_geglu = triton_groupnorm.GroupNorm.run, triton_geglu.Geglu.run

    def counted(self, x, weight, bias):
        calls.append(self.silu)
        return real_norm(self, x, weight, bias)
    # The call sites' kernel objects launch through run() on CPU (no compiled launchers to bind).
    monkeypatch.setattr(triton_groupnorm.GroupNorm, "run", counted)
    monkeypatch.setattr(triton_geglu.Geglu, "run", lambda self, h: calls.append("geglu") or real_geglu(self, h))
    return calls


def resblock(channels=32, out_channels=64, **kw):
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock
    torch.manual_seed(0)
    block = ResBlock(channels, 16, 0.0, out_channels, dims=2, operations=comfy.ops.disable_weight_init, **kw)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return block.eval()


@pytest.mark.parametrize("kw", [{}, {"down": True}])
def test_resblock_gives_the_hosts_numbers_with_groupnorm_and_silu_fused(kernel_calls, kw):
    block = resblock(**kw)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 32, 6, 10, generator=g) * 2 + 1
    emb = torch.randn(1, 16, generator=g)
    with torch.no_grad():
        before = block(x, emb)
    names = float_fusions.install(block)
    # Both Sequentials and both GroupNorms (an up/down block slices in_layers and reaches the GroupNorm's own).
    assert names == ["in_layers", "in_layers.0", "out_layers", "out_layers.0"]
    with torch.no_grad():
        after = block(x, emb)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    # Plain: each Sequential's GroupNorm + SiLU in one call; up/down: in_layers[:-1] runs the GroupNorm alone.
    assert kernel_calls == ([False, True] if kw else [True, True])


def spatial_transformer():
    import comfy.ops
    from comfy.ldm.modules.attention import SpatialTransformer
    torch.manual_seed(0)
    st = SpatialTransformer(32, 2, 16, depth=1, context_dim=24, use_linear=True,
                            operations=comfy.ops.disable_weight_init).eval()
    with torch.no_grad():
        for p in st.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    g = torch.Generator().manual_seed(2)
    return st, torch.randn(1, 32, 4, 6, generator=g), torch.randn(1, 5, 24, generator=g)


def test_spatial_transformer_norm_and_geglu_are_fused(kernel_calls):
    st, x, ctx = spatial_transformer()
    with torch.no_grad():
        before = st(x, context=[ctx])
    assert float_fusions.install(st) == ["norm", "transformer_blocks.0.ff.net.0"]
    with torch.no_grad():
        after = st(x, context=[ctx])
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert kernel_calls == [False, "geglu"]
    # Autograd (QAT through a block): the host's GEGLU.
    kernel_calls.clear()
    geglu = st.get_submodule("transformer_blocks.0.ff.net.0")
    out = geglu(torch.randn(1, 3, 32, requires_grad=True))
    assert out.requires_grad and kernel_calls == []


def test_an_int8_geglu_projection_feeds_the_fused_gate(kernel_calls, monkeypatch):
    """Quantized in place (the INT8 proj runs, then the gate kernel): the same output as the host's GroupNorm and
    GEGLU around the same INT8 layers, up to an int8 rounding flip of the next layer's input."""
    from comfyui_octet import octet
    st, x, ctx = spatial_transformer()
    result = octet.quantize_(st, octet.DynamicW8A8Config(backend="triton"))
    assert "transformer_blocks.0.ff.net.0.proj" in [r.name for r in result.quantized]
    assert result.float_fusions == ["norm", "transformer_blocks.0.ff.net.0"]
    with torch.no_grad():
        st(x, context=[ctx])                              # plans at this shape
        fused = st(x, context=[ctx])
        monkeypatch.setenv("OCTET_FLOAT_FUSIONS", "0")
        host = st(x, context=[ctx])
    assert kernel_calls == [False, "geglu"] * 2
    torch.testing.assert_close(fused, host, rtol=0, atol=2e-3 * float(host.abs().max()))


def test_what_the_kernel_must_not_take_runs_the_hosts_forward(kernel_calls, monkeypatch):
    block = resblock()
    float_fusions.install(block)
    x, emb = torch.randn(1, 32, 4, 4), torch.randn(1, 16)
    norm = block.in_layers[0]
    with torch.no_grad():
        block(x, emb)
    assert kernel_calls == [True, True]
    kernel_calls.clear()
    # lowvram / manual_cast: the host casts (and may move) the weights per call.
    norm.comfy_cast_weights = True
    with torch.no_grad():
        block(x, emb)
    assert kernel_calls == [True]
    norm.comfy_cast_weights = False
    # A weight patch (the host's weight_function) changes the weight per call.
    norm.weight_function = [lambda w: w * 2]
    with torch.no_grad():
        patched = block.in_layers(x)
    assert kernel_calls == [True]
    norm.weight_function = []
    F = torch.nn.functional
    torch.testing.assert_close(patched, block.in_layers[2](F.silu(F.group_norm(x, 32, norm.weight * 2, norm.bias,
                                                                              norm.eps))))
    kernel_calls.clear()
    # Autograd (QAT, training): the kernels have no backward.
    xg = x.clone().requires_grad_(True)
    out = block.in_layers(xg)
    assert out.requires_grad and kernel_calls == []
    # Off by the switch; a channels_last input the kernel does not read.
    monkeypatch.setenv("OCTET_FLOAT_FUSIONS", "0")
    with torch.no_grad():
        block.in_layers(x)
    monkeypatch.setenv("OCTET_FLOAT_FUSIONS", "1")
    with torch.no_grad():
        block.in_layers(x.to(memory_format=torch.channels_last))
    assert kernel_calls == []


def test_unset_switch_keeps_the_interpreter_on_the_hosts_groupnorm(monkeypatch):
    monkeypatch.delenv("OCTET_FLOAT_FUSIONS", raising=False)
    assert not float_fusions.enabled()        # under TRITON_INTERPRET=1 (this module's condition)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert float_fusions.enabled()


def test_quantize_model_installs_it_as_graph_safe_object_patches():
    from comfyui_octet.nodes import graph_step
    unet = rm.load_reference("unet", "plain")
    q, result = bridge.quantize_model(unet, DynamicW8A8Config(backend="triton"))
    dm = unet.model.diffusion_model
    norms = sorted(n for n, m in dm.named_modules() if isinstance(m, torch.nn.GroupNorm))
    geglus = sorted(n for n, m in dm.named_modules() if type(m).__name__ == "GEGLU")
    assert norms and geglus and set(norms + geglus) <= set(result.float_fusions)
    sequentials = [n for n in result.float_fusions if n not in norms + geglus]
    assert sequentials and all(n.endswith(("in_layers", "out_layers")) or n == "out" for n in sequentials)
    assert (f"{len(norms)} GroupNorms ({len(sequentials)} with their SiLU) and {len(geglus)} GEGLU gates fused where "
            f"the Triton kernels run") in result.summary()
    assert result.chains == []
    for n in result.float_fusions:
        patch = q.object_patches[f"diffusion_model.{n}.forward"]
        assert isinstance(patch, float_fusions.FORWARDS) and graph_step._safe_object_patch(n, patch)


def test_a_loaded_checkpoint_gets_them_and_a_dropped_block_is_not_kept_alive(tmp_path):
    """Load Quantized installs them like Quantize Model does; the patched forwards refer to their module weakly,
    so a dropped model goes with its last reference, not at the next garbage collection."""
    import gc
    import weakref
    from comfyui_octet import octet
    from comfyui_octet.octet import checkpoint
    st, _, _ = spatial_transformer()
    octet.quantize_(st, octet.DynamicW8A8Config())
    path = str(tmp_path / "st.safetensors")
    checkpoint.save(path, st, {"architecture": "test"})
    fresh, _, _ = spatial_transformer()
    checkpoint.install(fresh, checkpoint.read(path))
    assert isinstance(vars(fresh.norm).get("forward"), float_fusions.GroupNormForward)
    assert isinstance(vars(fresh.get_submodule("transformer_blocks.0.ff.net.0")).get("forward"),
                      float_fusions.GegluForward)
    block = resblock()
    float_fusions.install(block)
    ref = weakref.ref(block)
    gc.disable()
    try:
        del block
        assert ref() is None
    finally:
        gc.enable()
