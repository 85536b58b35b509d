"""MLP chains installed by quantize_ (static chains; the GELU in a W8A8 fc1's epilogue): which containers,
same numbers as the layers, fallbacks."""
import pytest
import torch
import torch.nn as nn

from comfyui_octet import octet
from comfyui_octet import kernels
from comfyui_octet.kernels.backends import triton_support
from comfyui_octet.octet import checkpoint, fusion
from comfyui_octet.octet.calibration import record
from comfyui_octet.octet.timestep import GroupSelector


class Mlp(nn.Module):
    """The shape of SD3's / timm's Mlp: fc1, act, drop1, norm, fc2, drop2."""

    def __init__(self, d, h, act):
        super().__init__()
        self.fc1, self.act, self.drop1 = nn.Linear(d, h), act, nn.Dropout(0.0)
        self.norm, self.fc2, self.drop2 = nn.Identity(), nn.Linear(h, d), nn.Dropout(0.0)

    def forward(self, x):
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))


class Net(nn.Module):
    def __init__(self, d=32, h=80):
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.img_mlp = nn.Sequential(nn.Linear(d, h), nn.GELU(approximate="tanh"), nn.Linear(h, d))  # Flux / Wan
        self.mlp = Mlp(d, h, nn.GELU(approximate="tanh"))                                               # SD3
        self.erf_mlp = nn.Sequential(nn.Linear(d, h), nn.GELU(), nn.Linear(h, d))    # exact GELU: not a chain
        self.geglu = nn.Sequential(nn.Linear(d, h), nn.SiLU(), nn.Linear(h, d))      # other activation: not one

    def forward(self, x):
        x = self.inp(x)
        return self.geglu(self.erf_mlp(self.mlp(self.img_mlp(x) + x) + x)) + x


def _calibrated(net, rng, groups=(1.0,), also=None):
    """Statistics of two random batches (and of ``also``, the input a test will evaluate, if given)."""
    selector = GroupSelector(list(groups))
    with torch.no_grad(), record(net, selector, architecture="test") as cal:
        for sigma in (0.5, 2.0):
            selector.select(sigma)
            net(torch.randn(4, 9, 32, generator=rng))
        if also is not None:
            net(also)
    return cal


def _net(rng):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng)))
    return Net()


def test_quantize_installs_chains_only_where_both_layers_are_static_and_gelu_tanh(rng):
    net = _net(rng)
    cal = _calibrated(net, rng)
    result = octet.quantize_(net, octet.StaticW8A8Config(timestep_groups=True), calibration=cal, inplace=False)
    assert result.chains == ["img_mlp", "mlp"] and result.static_chains == ["img_mlp", "mlp"]
    assert "2 MLPs run as static INT8 chains" in result.summary()
    assert "epilogue" not in result.summary()
    assert "forward" not in vars(net.img_mlp)                 # inplace=False leaves the model alone
    # Dynamic: the same two containers (the GELU in fc1's epilogue), no static chain, no deferred GELU.
    dyn = octet.quantize_(_net(rng), octet.DynamicW8A8Config(), inplace=False)
    assert dyn.chains == ["img_mlp", "mlp"] and dyn.static_chains == [] and dyn.gelus == []
    assert "2 MLPs apply their GELU in fc1's INT8 epilogue" in dyn.summary()
    assert "static INT8 chains" not in dyn.summary()
    weight_only = octet.quantize_(_net(rng), octet.WeightOnlyConfig(), inplace=False)
    assert weight_only.chains == []


def test_policy_keeping_fc2_float_means_no_chain(rng):
    net = _net(rng)
    cal = _calibrated(net, rng)

    class KeepFc2:
        def decide(self, name, module, default):
            return (None, "kept") if name == "img_mlp.2" else (default, "")

    result = octet.quantize_(net, octet.StaticW8A8Config(), policy=KeepFc2(), calibration=cal, inplace=False)
    assert result.static_chains == ["mlp"]
    assert result.chains == ["img_mlp", "mlp"]      # img_mlp's static fc1 still applies the GELU


@pytest.mark.parametrize("smooth_alpha", [None, 0.5])
def test_chained_model_equals_layered_model_on_cpu(smooth_alpha, rng, monkeypatch):
    """fp32 on CPU: the chain (torch reference) computes exactly what the separate layers compute,
    in every timestep group, and the calls really go through the chain."""
    net = _net(rng)
    cal = _calibrated(net, rng)
    config = octet.StaticW8A8Config(timestep_groups=True, smooth_alpha=smooth_alpha)
    octet.quantize_(net, config, calibration=cal)
    calls = []
    real = kernels.plan_mlp

    def counting_plan(*a, **k):
        run = real(*a, **k)
        return lambda *args: calls.append(1) or run(*args)
    monkeypatch.setattr(kernels, "plan_mlp", counting_plan)
    x = torch.randn(3, 9, 32, generator=rng)
    selector = net.inp.group_selector
    for sigma in (0.3, 3.0):
        selector.select(sigma)
        with torch.no_grad():
            chained = net(x)
            monkeypatch.setenv("OCTET_FUSED_MLP", "0")
            layered = net(x)
            monkeypatch.setenv("OCTET_FUSED_MLP", "1")
        assert torch.equal(chained, layered)
    assert len(calls) == 4    # two chains, two groups


# Its tensors are CPU tensors: the Triton kernels run on them only under the interpreter (on a GPU
# machine without TRITON_INTERPRET=1 the triton backend rejects them and nothing is fused).
@pytest.mark.skipif(not triton_support.interpreting(), reason="needs TRITON_INTERPRET=1 (CPU tensors)")
def test_triton_chain_runs_fused_kernel_and_matches_layers(rng, monkeypatch):
    """Within INT8 error of float on inputs the calibration covered: static scales clip values beyond
    the calibrated range, so on a fresh draw the error measures the calibration's coverage (0.10 at
    worst over 300 seeds), not the kernel; covered, it is below 0.01 over 150 seeds (tests/seed_sweep.py)."""
    net = _net(rng)
    x = torch.randn(2, 9, 32, generator=rng)
    cal = _calibrated(net, rng, also=x)
    float_out = None
    with torch.no_grad():
        float_out = net(x).double()
    octet.quantize_(net, octet.StaticW8A8Config(backend="triton", smooth_alpha=0.5), calibration=cal)
    from comfyui_octet.kernels.backends import triton_gemm
    fused = []
    real = triton_gemm.W8A8Gemm.__call__
    monkeypatch.setattr(triton_gemm.W8A8Gemm, "__call__",
                        lambda self, *a, **k: (self.gelu_quant and fused.append(1)) or real(self, *a, **k))
    with torch.no_grad():
        chained = net(x).double()
        monkeypatch.setenv("OCTET_FUSED_MLP", "0")
        layered = net(x).double()
    assert len(fused) == 2
    err = lambda a: float((a - float_out).norm() / float_out.norm())  # noqa: E731
    assert err(chained) < 0.05 and err(layered) < 0.05
    assert float((chained - layered).norm() / layered.norm()) < 0.01


def test_swapped_or_patched_layer_falls_back_to_the_container(rng):
    net = _net(rng)
    cal = _calibrated(net, rng)
    octet.quantize_(net, octet.StaticW8A8Config(), calibration=cal)
    x = torch.randn(2, 5, 32, generator=rng)
    fc2 = net.img_mlp[2]
    fc2.weight_function.append(lambda w: w * 0)      # like a per-call LoRA patch: must not be bypassed
    with torch.no_grad():
        out = net.img_mlp(x)
    expected_bias = fc2.bias.expand_as(out)
    assert torch.allclose(out, expected_bias)
    fc2.weight_function.clear()
    float_fc2 = nn.Linear(80, 32)
    net.img_mlp[2] = float_fc2                       # e.g. QAT's fake-quant twin, a restored float layer
    with torch.no_grad():
        h = net.img_mlp[1](net.img_mlp[0](x))
        torch.testing.assert_close(net.img_mlp(x), float_fc2(h))


def test_save_load_reinstalls_chains(tmp_path, rng):
    net = _net(rng)
    cal = _calibrated(net, rng)
    octet.quantize_(net, octet.StaticW8A8Config(), calibration=cal)
    path = str(tmp_path / "m.safetensors")
    checkpoint.save(path, net, {"architecture": "test"})
    fresh = Net()
    checkpoint.install(fresh, checkpoint.read(path))
    assert "forward" in vars(fresh.img_mlp) and "forward" in vars(fresh.mlp)
    assert "forward" not in vars(fresh.erf_mlp)
    x = torch.randn(2, 5, 32, generator=rng)
    net.inp.group_selector.select(0.1)   # the loaded copy has no selector here: both in group 0
    with torch.no_grad():
        assert torch.equal(fresh(x), net(x))


class WanFfnBlock(nn.Module):
    """The data flow of Wan's WanAttentionBlock FFN (both hosts): ffn(addcmul(shift, norm2(x), 1 + scale)),
    then the gated residual."""

    def __init__(self, d=32, h=96):
        super().__init__()
        self.norm2 = nn.LayerNorm(d, eps=1e-6, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(d, h), nn.GELU(approximate="tanh"), nn.Linear(h, d))
        self.modulation = nn.Parameter(torch.randn(1, 3, d) * 0.2)

    def forward(self, x):
        shift, scale, gate = self.modulation.chunk(3, dim=1)
        return torch.addcmul(x, self.ffn(torch.addcmul(shift, self.norm2(x), 1 + scale)), gate)


def _count_gelu_gemms(monkeypatch):
    from comfyui_octet.kernels.backends import triton_gemm
    calls = []
    real = triton_gemm.W8A8Gemm.run
    monkeypatch.setattr(triton_gemm.W8A8Gemm, "run",
                        lambda self, *a, **k: (self.gelu and calls.append(1)) or real(self, *a, **k))
    return calls


@pytest.mark.skipif(not triton_support.interpreting(), reason="needs TRITON_INTERPRET=1 (CPU tensors)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dynamic_fc1_applies_the_gelu_in_its_epilogue(dtype, rng, monkeypatch):
    """Dynamic W8A8 through the Triton kernels (the interpreter): each MLP's fc1 GEMM applies the GELU (two
    GEMMs with the GELU epilogue per forward, one per MLP) and the model computes what it computes with the
    host's GELU module (OCTET_FUSED_MLP=0): in fp32 up to the last bits of the GELU's formula (and the odd code
    of fc2's quantization that flips with them), in bf16 up to the one rounding of fc1's output the host adds."""
    net = _net(rng).to(dtype)
    octet.quantize_(net, octet.DynamicW8A8Config(backend="triton"))
    calls = _count_gelu_gemms(monkeypatch)
    x = torch.randn(2, 9, 32, generator=rng).to(dtype)
    with torch.no_grad():
        fused = net(x).double()
        assert len(calls) == 2
        monkeypatch.setenv("OCTET_FUSED_MLP", "0")
        layered = net(x).double()
    assert len(calls) == 2
    rel = float((fused - layered).norm() / layered.norm())
    assert rel < (1e-3 if dtype == torch.float32 else 2e-2), rel
    hidden_fused = net.img_mlp[0].forward_gelu(net.inp(x)).double()
    hidden_host = net.img_mlp[1](net.img_mlp[0](net.inp(x))).double()
    tol = 1e-5 if dtype == torch.float32 else 2 ** -7
    assert ((hidden_fused - hidden_host).abs() <= tol * (1 + hidden_host.abs())).all()


@pytest.mark.skipif(not triton_support.interpreting(), reason="needs TRITON_INTERPRET=1 (CPU tensors)")
def test_wan_ffn_takes_its_deferred_norm_and_applies_the_gelu_in_fc1(rng, monkeypatch):
    """Wan's FFN: norm2 + modulation deferred into fc1's quantization (octet/deferred.py) and the GELU in fc1's
    epilogue, both in the same call: one GELU-epilogue GEMM fed by the norm quantizer, and the block's output
    as the host's ops with the deferral and the chain off compute it (fp32, within INT8 code flips)."""
    from comfyui_octet.kernels.backends import triton_quant
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng)))
    block = WanFfnBlock()
    result = octet.quantize_(block, octet.DynamicW8A8Config(backend="triton"))
    assert result.chains == ["ffn"] and result.norms == ["norm2"]
    calls = _count_gelu_gemms(monkeypatch)
    norms = []
    real_norm = triton_quant.NormRowQuantizer.__call__
    monkeypatch.setattr(triton_quant.NormRowQuantizer, "__call__",
                        lambda self, *a, **k: norms.append(1) or real_norm(self, *a, **k))
    x = torch.randn(2, 11, 32, generator=rng) * 3
    with torch.no_grad():
        fused = block(x)
        assert len(calls) == 1 and len(norms) == 1
        monkeypatch.setenv("OCTET_FUSED_MLP", "0")
        monkeypatch.setenv("OCTET_DEFERRED", "0")
        host = block(x)
    assert len(calls) == 1 and len(norms) == 1
    assert float((fused - host).norm() / (host - x).norm()) < 2e-3


def test_a_hooked_gelu_or_a_float_fc1_runs_the_container(rng):
    """Computing the GELU inside fc1 would skip a hook on the GELU module: such a call runs the container's own
    forward (the hook sees the GELU), as does an fc1 that is not a W8A8 layer any more."""
    net = _net(rng)
    octet.quantize_(net, octet.DynamicW8A8Config())
    assert fusion.is_chain_forward(vars(net.img_mlp)["forward"])
    seen = []
    handle = net.img_mlp[1].register_forward_hook(lambda m, a, out: seen.append(out.shape))
    x = torch.randn(2, 5, 32, generator=rng)
    with torch.no_grad():
        net.img_mlp(x)
    handle.remove()
    assert seen == [(2, 5, 80)]
    float_fc1 = nn.Linear(32, 80)
    net.img_mlp[0] = float_fc1
    with torch.no_grad():
        torch.testing.assert_close(net.img_mlp(x), net.img_mlp[2](net.img_mlp[1](float_fc1(x))))


def test_chain_parts_reads_the_two_mlp_shapes_and_nothing_else():
    """What the per-call check accepts: Sequential(Linear, GELU(tanh), Linear) and an SD3 / timm Mlp whose other
    children are identities; not an Mlp with another child, a live dropout or an exact GELU."""
    seq = nn.Sequential(nn.Linear(4, 8), nn.GELU(approximate="tanh"), nn.Linear(8, 4))
    assert fusion.chain_parts(seq) == (seq[0], seq[1], seq[2], "0", "2")
    mlp = Mlp(4, 8, nn.GELU(approximate="tanh"))
    assert fusion.chain_parts(mlp) == (mlp.fc1, mlp.act, mlp.fc2, "fc1", "fc2")
    mlp.drop1 = nn.Dropout(0.5)
    assert fusion.chain_parts(mlp) is None              # training mode: a live dropout between fc1 and fc2
    mlp.eval()
    assert fusion.chain_parts(mlp) is not None
    mlp.extra = nn.Linear(4, 4)
    assert fusion.chain_parts(mlp) is None
    assert fusion.chain_parts(Mlp(4, 8, nn.GELU())) is None
    assert fusion.chain_parts(nn.Sequential(nn.Linear(4, 8), nn.GELU(approximate="tanh"))) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the kernels compiled for it)")
def test_gelu_epilogue_on_the_gpu_matches_the_layers_and_binds(rng, monkeypatch):
    """bf16 on a GPU, through Triton's compiled kernels: the GELU-epilogue GEMM runs once per MLP call (its first
    calls through the general path, later ones through the bound call), and the output stays within bf16 rounding
    and the odd int8 code of the layered run (the host's GELU module after fc1)."""
    net = _net(rng).to("cuda", torch.bfloat16)
    octet.quantize_(net, octet.DynamicW8A8Config(backend="triton"))
    x = torch.randn(2, 300, 32, generator=rng).to("cuda", torch.bfloat16)
    from comfyui_octet.kernels.backends import triton_backend
    made = []
    real = triton_backend._W8A8Linear.with_gelu
    monkeypatch.setattr(triton_backend._W8A8Linear, "with_gelu", lambda self: made.append(1) or real(self))
    with torch.no_grad():
        outs = [net(x).float() for _ in range(3)]
        assert len(made) == 6          # two MLPs a call
        monkeypatch.setenv("OCTET_FUSED_MLP", "0")
        layered = net(x).float()
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[1], outs[2])    # the bound call: the same numbers
    rel = float((outs[0] - layered).norm() / layered.norm())
    assert rel < 2e-2, rel


@pytest.mark.skipif(not triton_support.interpreting(), reason="needs TRITON_INTERPRET=1 (CPU tensors)")
def test_a_pending_output_is_the_layers_output_unless_a_gated_residual_takes_it(rng):
    """QuantLinear.pending_output: ``addcmul(res, pending, gate)`` with a gate per batch entry computes
    res + output * gate in the GEMM's epilogue (within fp32 rounding of the layer then addcmul); any other use, a
    per-token gate included, gets the layer's own output, bit for bit."""
    from comfyui_octet.octet.deferred import PendingOutput
    from comfyui_octet.octet.modules import QuantLinear
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng)))
    layer = QuantLinear.from_float(nn.Linear(48, 32), "dynamic", backend="triton")
    x = torch.randn(2, 7, 48, generator=rng)
    res = torch.randn(2, 7, 32, generator=rng)
    gate = torch.randn(2, 6, 32, generator=rng)[:, 5:6]
    with torch.no_grad():
        y = layer(x)
        pending = layer.pending_output(x)
        assert type(pending) is PendingOutput and pending.shape == y.shape
        fused = torch.addcmul(res, pending, gate)
        assert type(fused) is torch.Tensor
        torch.testing.assert_close(fused, torch.addcmul(res, y, gate), rtol=1e-5, atol=1e-5)
        assert torch.equal(layer.pending_output(x) * 2, y * 2)
        per_token = torch.randn(2, 7, 32, generator=rng)
        assert torch.equal(torch.addcmul(res, layer.pending_output(x), per_token), torch.addcmul(res, y, per_token))
        float_layer = nn.Linear(32, 16)
        assert torch.equal(float_layer(layer.pending_output(x)), float_layer(y))
