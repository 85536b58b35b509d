"""Deferred GELU (octet/deferred.py): a GELU(tanh) hands its input to the next INT8 linear, which
applies it (and Flux's cat) inside its quantization kernel. Checked against the same model with the
deferral off: same numbers up to the GELU's last bit, and never a wrong number where it cannot apply."""
import logging

import pytest
import torch
import torch.nn as nn

from comfyui_octet import octet
from comfyui_octet.kernels.backends import triton_support
from comfyui_octet.octet import checkpoint, deferred
from comfyui_octet.octet.deferred import PendingGelu

needs_triton = pytest.mark.skipif(triton_support.unavailable_reason() is not None or
                                  not triton_support.interpreting(),
                                  reason="needs Triton (TRITON_INTERPRET=1 on CPU)")


class SingleBlock(nn.Module):
    """The data flow of Flux's SingleStreamBlock (both hosts): addcmul(shift, layer_norm(x), 1 + scale) ->
    linear1 -> split -> attention-ish ‖ GELU -> linear2(cat((attn, gelu(mlp)), 2))."""

    def __init__(self, d=24, h=72):
        super().__init__()
        self.d, self.h = d, h
        self.modulation = nn.Linear(d, 2 * d)
        self.pre_norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.linear1 = nn.Linear(d, 3 * d + h)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.linear2 = nn.Linear(d + h, d)

    def forward(self, x):
        shift, scale = self.modulation(x.mean(1, keepdim=True)).chunk(2, dim=-1)
        qkv, mlp = torch.split(self.linear1(torch.addcmul(shift, self.pre_norm(x), 1 + scale)),
                               [3 * self.d, self.h], dim=-1)
        q, k, v = qkv.chunk(3, dim=-1)
        attn = torch.softmax(q @ k.transpose(1, 2) / self.d ** 0.5, dim=-1) @ v
        mlp = self.mlp_act(mlp)
        return x + self.linear2(torch.cat((attn, mlp), 2))


class Net(nn.Module):
    def __init__(self, d=24):
        super().__init__()
        self.img_mlp = nn.Sequential(nn.Linear(d, 64), nn.GELU(approximate="tanh"), nn.Linear(64, d))
        self.single = SingleBlock(d)
        self.erf_mlp = nn.Sequential(nn.Linear(d, 64), nn.GELU(), nn.Linear(64, d))   # exact GELU: not a site

    def forward(self, x):
        return self.erf_mlp(self.single(self.img_mlp(x) + x)) + x


def test_pending_gelu_is_the_gelu_for_anything_but_its_consumer(rng, caplog):
    pre = torch.randn(2, 5, 12, generator=rng)
    head = torch.randn(2, 5, 4, generator=rng)
    gelu = torch.nn.functional.gelu(pre, approximate="tanh")
    p = PendingGelu(None, pre)
    assert p.shape == (2, 5, 12) and p.dtype == pre.dtype and p.dim() == 3 and p.size(-1) == 12
    # Flux's cat becomes a pending cat (nothing computed yet) ...
    joined = torch.cat((head, p), 2)
    assert type(joined) is PendingGelu and joined.head is head and joined.pre is pre and joined.shape == (2, 5, 16)
    assert torch.equal(joined.materialize(), torch.cat((head, gelu), 2))
    # ... anything else computes the real tensor first, bit for bit nn.GELU's, and says so once (once per
    # process: forget an earlier test's message so that this one does not depend on the order).
    from comfyui_octet.kernels import registry
    registry._logged.discard("deferred:mul")
    with caplog.at_level(logging.INFO, logger="octet"):
        assert torch.equal(p * 2, gelu * 2)
        assert torch.equal(p * 3, gelu * 3)
        assert torch.equal(torch.cat((p, head), 2), torch.cat((gelu, head), 2))      # pending first: not Flux's
        assert torch.equal(nn.functional.linear(joined, torch.ones(3, 16)),
                           nn.functional.linear(torch.cat((head, gelu), 2), torch.ones(3, 16)))
    assert sum("deferred input was computed in float for mul" in r.getMessage() for r in caplog.records) == 1
    assert type(p * 2) is torch.Tensor


def test_in_place_writes_to_a_pending_gelu_are_kept(rng):
    """A host that modulates the GELU output in place (``t[:, a:b] *= m``, as Flux's apply_mod does with
    modulation_dims) writes into the one materialized tensor, and the consumer then receives that."""
    pre = torch.randn(2, 6, 16, generator=rng)
    mult = torch.randn(2, 1, 16, generator=rng)
    expected = torch.nn.functional.gelu(pre, approximate="tanh")
    expected[:, 1:4] *= mult
    p = PendingGelu(None, pre)
    p[:, 1:4] *= mult
    assert type(p) is PendingGelu and p.computed is not None
    assert type(torch.cat((torch.zeros(2, 6, 3), p), 2)) is torch.Tensor   # no longer fused: it holds data
    layer = octet.modules.QuantLinear.from_float(nn.Linear(16, 8), "dynamic")
    with torch.no_grad():
        assert torch.equal(layer(p), layer(expected))      # the consumer gets the written tensor
        p += 1                         # an in-place operator hands back the computed tensor itself
        assert type(p) is torch.Tensor and torch.equal(p, expected + 1)


def test_sites_are_gelu_tanh_before_an_int8_activation_linear(rng):
    torch.manual_seed(0)
    net = Net()
    result = octet.quantize_(net, octet.DynamicW8A8Config(), inplace=False)
    # The MLP's GELU (straight into fc2) is not a site: measured slower fused than in float (deferred.py); fc1's
    # epilogue applies it instead (octet/fusion.py).
    assert result.gelus == ["single.mlp_act"] and result.chains == ["img_mlp"]
    assert result.norms == ["single.pre_norm"]
    assert "1 GELUs and 1 LayerNorms applied inside the next INT8 layer's quantization" in result.summary()
    weight_only = octet.quantize_(Net(), octet.WeightOnlyConfig(), inplace=False)
    assert not weight_only.forwards      # weight-only layers quantize nothing: nothing to apply a GELU in


def _quantized(rng, backend):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng)))
    net = Net()
    octet.quantize_(net, octet.DynamicW8A8Config(backend=backend))
    return net


@needs_triton
def test_int8_consumer_applies_the_gelu_and_cat_with_the_same_numbers(rng, monkeypatch):
    from comfyui_octet.kernels.backends import triton_backend
    net = _quantized(rng, "triton")
    calls = []
    real, real_norm = triton_backend._W8A8Linear.gelu_input, triton_backend._W8A8Linear.norm_input
    monkeypatch.setattr(triton_backend._W8A8Linear, "gelu_input",
                        lambda self, *a: calls.append(a[0] is not None) or real(self, *a))
    monkeypatch.setattr(triton_backend._W8A8Linear, "norm_input",
                        lambda self, *a: calls.append("norm" if a[2] is not None else "bare") or real_norm(self, *a))
    x = torch.randn(2, 7, 24, generator=rng)
    with torch.no_grad():
        # The first call at this shape makes the plans and already takes the fused path, so it computes
        # what every later call does (a prompt's first step = the same step of its re-run).
        first = net(x)
        # the block's linear2 (attn head) and its linear1 (norm + modulation)
        assert sorted(calls, key=str) == [True, "norm"]
        fused = net(x)
        assert sorted(calls, key=str) == [True, True, "norm", "norm"] and torch.equal(first, fused)
        monkeypatch.setenv("OCTET_DEFERRED", "0")
        layered = net(x)
    assert len(calls) == 4
    # fp32 activations: the kernel's GELU and torch's differ in the last bit at most, which can move one
    # int8 code by one step; the output stays within a few quantization steps of the layered run.
    err = (fused - layered).abs().max().item()
    assert err < 2e-2 * layered.abs().max().item(), err


@needs_triton
def test_a_plan_whose_gemm_cannot_hide_the_deferrals_host_time_gets_the_float_ops_output(rng, monkeypatch):
    """Eager plans of short GEMMs (triton_backend.deferral_pays: SD3.5's layers on a GPU) decline deferred
    inputs: the norm and GELU compute in float and the layer quantizes their output, with the layered numbers."""
    from comfyui_octet.kernels.backends import triton_backend
    net = _quantized(rng, "triton")
    calls = []
    real_norm, real_gelu = triton_backend._W8A8Linear.norm_input, triton_backend._W8A8Linear.gelu_input
    monkeypatch.setattr(triton_backend._W8A8Linear, "norm_input", lambda self, *a: calls.append(1) or real_norm(self, *a))
    monkeypatch.setattr(triton_backend._W8A8Linear, "gelu_input", lambda self, *a: calls.append(1) or real_gelu(self, *a))
    monkeypatch.setattr(triton_backend, "deferral_pays", lambda req: False)   # every plan made from here on
    x = torch.randn(2, 7, 24, generator=rng)
    with torch.no_grad():
        declined = [net(x), net(x)]
        monkeypatch.setenv("OCTET_DEFERRED", "0")
        layered = net(x)
    assert calls == [] and all(torch.equal(y, layered) for y in declined)


@needs_triton
def test_a_declined_deferral_is_remembered_until_a_plan_is_made(rng, monkeypatch):
    """An eager SD3.5 step asks each of its 95 LayerNorms' consumers whether they take a deferred input, and
    is told no every time (deferral_pays): the "no" is kept per signature until a plan is made anywhere."""
    from comfyui_octet.kernels.backends import triton_backend
    from comfyui_octet.octet.modules import QuantLayer
    net = _quantized(rng, "triton")
    x = torch.randn(2, 7, 24, generator=rng)
    asked, deferred_in = [], []
    real_takes, real_norm = QuantLayer.takes_deferred, triton_backend._W8A8Linear.norm_input
    monkeypatch.setattr(QuantLayer, "takes_deferred", lambda self, *a: asked.append(1) or real_takes(self, *a))
    monkeypatch.setattr(triton_backend._W8A8Linear, "norm_input",
                        lambda self, *a: deferred_in.append(1) or real_norm(self, *a))
    with torch.no_grad():
        monkeypatch.setenv("OCTET_DEFERRED", "0")
        expected = net(x)                    # plans made; the norms and GELUs in float, the layers quantize
        monkeypatch.delenv("OCTET_DEFERRED")
        plans = [p for layer in net.modules() for p in getattr(layer, "_plans", {}).values()
                 if hasattr(p.run, "deferral_pays")]
        for p in plans:
            p.run.deferral_pays = False
        del asked[:]
        first = net(x)
        once = len(asked)
        again = [net(x) for _ in range(2)]
        assert once > 0 and len(asked) == once and deferred_in == []     # asked in the first call only
        for p in plans:
            p.run.deferral_pays = True
        net(torch.randn(1, 3, 24, generator=rng))   # a new shape: new plans, so every kept "no" is stale
        del asked[:], deferred_in[:]
        net(x)
    assert len(asked) >= once and deferred_in == [1]       # asked again, and the norm deferred this time
    assert all(torch.equal(y, expected) for y in [first, *again])


@needs_triton
def test_consumer_that_cannot_take_it_gets_the_real_tensor(rng):
    net = _quantized(rng, "triton")
    x = torch.randn(1, 3, 24, generator=rng)
    with torch.no_grad():
        net(x)
        expected = net(x)
        # A per-call weight patch (LoRA under lowvram) on linear2 after its GELU deferred: the layer takes
        # the float path, and the pending input must arrive as the real cat(attn, gelu).
        pending = torch.cat((torch.randn(1, 3, 24, generator=rng), PendingGelu(None, torch.randn(1, 3, 72))), 2)
        layer = net.single.linear2
        layer.weight_function = [lambda w: w]
        try:
            y = layer(pending)
        finally:
            layer.weight_function = []
        ref = torch.nn.functional.linear(pending.materialize(), layer.dequantized_weight(), layer.bias)
    assert torch.allclose(y, ref, atol=1e-5)
    assert torch.isfinite(expected).all()


def test_pending_norm_keeps_the_modulation_and_nothing_else(rng):
    x = torch.randn(2, 5, 8, generator=rng)
    shift, scale = torch.randn(2, 1, 8, generator=rng), torch.randn(2, 1, 8, generator=rng)
    normed = torch.nn.functional.layer_norm(x, (8,), None, None, 1e-6)
    p = deferred.PendingNorm(x, 1e-6)
    mod = torch.addcmul(shift, p, 1 + scale)
    assert type(mod) is deferred.PendingNorm and mod.mult is not None and mod.x is x
    assert torch.equal(mod.materialize(), torch.addcmul(shift, normed, 1 + scale))
    assert torch.equal(p.materialize(), normed)
    # A modulation that does not broadcast per batch entry (or any other op) is computed in float.
    wide = torch.randn(2, 5, 8, generator=rng)
    other = torch.addcmul(wide, deferred.PendingNorm(x, 1e-6), 1 + scale)
    assert type(other) is torch.Tensor and torch.equal(other, torch.addcmul(wide, normed, 1 + scale))


def test_loaded_checkpoint_defers_too(rng, tmp_path):
    net = _quantized(rng, "auto")
    path = str(tmp_path / "net.safetensors")
    checkpoint.save(path, net, {"architecture": "test"})
    fresh = Net()
    checkpoint.install(fresh, checkpoint.read(path))
    assert isinstance(vars(fresh.single.mlp_act).get("forward"), deferred.DeferredGeluForward)
    assert "forward" not in vars(fresh.img_mlp[1])
    assert isinstance(vars(fresh.single.pre_norm).get("forward"), deferred.DeferredNormForward)
    assert "forward" not in vars(fresh.erf_mlp[1])


def test_deferred_forwards_do_not_keep_a_dropped_model_alive(rng):
    """The forward patched onto a module refers back to it weakly: a quantized model that is dropped goes
    with its last reference (its GPU memory with it), not whenever the garbage collector next runs."""
    import gc
    import weakref
    net = _quantized(rng, "auto")
    assert any(isinstance(vars(m).get("forward"), deferred.DeferredForward) for m in net.modules())
    ref = weakref.ref(net)
    gc.disable()
    try:
        del net
        assert ref() is None
    finally:
        gc.enable()


def test_deferred_forwards_compile_without_graph_breaks(rng):
    """Under torch.compile (the host's TorchCompileModel) the patched GELU / LayerNorm forwards trace as the
    plain modules: no graph break, the eager numbers."""
    from compile_checks import assert_compiles_as_eager
    net = _quantized(rng, "auto").eval()
    assert any(isinstance(vars(m).get("forward"), deferred.DeferredNormForward) for m in net.modules())
    with torch.no_grad():
        assert_compiles_as_eager(net, torch.randn(2, 5, 24, generator=rng))


def test_where_the_kernels_run_follows_the_device_the_interpreter_and_tritons_import(monkeypatch):
    """kernel_input's device check: a CUDA tensor needs only Triton's import (CUDA is there); a CPU tensor
    needs TRITON_INTERPRET=1 and Triton; never a kernel where neither holds."""
    class OnCuda:   # stands in for a CUDA tensor here: only is_cuda is asked
        is_cuda = True
    monkeypatch.setattr(triton_support, "_IMPORT_ERROR", None)
    assert deferred._kernels_run_on(OnCuda())
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert deferred._kernels_run_on(torch.zeros(1))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not deferred._kernels_run_on(torch.zeros(1))
    monkeypatch.setattr(triton_support, "_IMPORT_ERROR", "triton not importable (ImportError: no)")
    assert not deferred._kernels_run_on(OnCuda())
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not deferred._kernels_run_on(torch.zeros(1))
