"""octet/compile_pass.py: under torch.compile, the float ops eager Octet computes inside its INT8 layers (Flux's
cat + GELU, a DiT's LayerNorm + modulation, an MLP's GELU) become one octet::linear_fused call, with eager
Octet's numbers; nothing else is rewritten, and a layer that cannot take them gets the host's float ops."""
import collections
import logging

import pytest
import torch
import torch._dynamo
import torch.nn as nn
import torch.nn.functional as F

from comfyui_octet import octet
from comfyui_octet.kernels import torch_ref
from comfyui_octet.kernels.backends import triton_backend
from comfyui_octet.octet import compile_pass, modules
from test_deferred import SingleBlock, needs_triton


class FluxLike(nn.Module):
    """A Flux single block, then a double block's MLP on its modulated LayerNorm (img_norm2 -> fc1 -> GELU -> fc2),
    named as Flux's, where eager Octet defers the same inputs (octet/deferred.py's sites)."""

    def __init__(self, d=24, h=72):
        super().__init__()
        self.single = SingleBlock(d, h)
        self.img_norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.mod2 = nn.Linear(d, 2 * d)
        self.img_mlp = nn.Sequential(nn.Linear(d, h), nn.GELU(approximate="tanh"), nn.Linear(h, d))

    def forward(self, x):
        x = self.single(x)
        shift, scale = self.mod2(x.mean(1, keepdim=True)).chunk(2, dim=-1)
        return x + self.img_mlp(torch.addcmul(shift, self.img_norm2(x), 1 + scale))


class GatedFlux(nn.Module):
    """Flux's residuals as ComfyUI writes them (apply_mod without modulation_dims: ``x += layer(...) * gate``), named
    as Flux's where eager defers the LayerNorms (octet/deferred.py _NORM_SITES): a double block's image stream
    (qkv on its modulated LayerNorm, the attention's proj, then the MLP on its modulated LayerNorm), then a single
    block (linear1 on its modulated LayerNorm, linear2 on the cat + GELU)."""

    def __init__(self, d=24, h=72):
        super().__init__()
        self.d, self.h = d, h
        self.img_in = nn.Linear(d, d)
        self.mod = nn.Linear(d, 9 * d)
        self.img_norm1, self.img_norm2, self.pre_norm = (nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
                                                         for _ in "123")
        self.img_attn = nn.Module()
        self.img_attn.qkv, self.img_attn.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.img_mlp = nn.Sequential(nn.Linear(d, h), nn.GELU(approximate="tanh"), nn.Linear(h, d))
        self.linear1 = nn.Linear(d, 3 * d + h)
        self.linear2 = nn.Linear(d + h, d)

    def attention(self, qkv):
        q, k, v = qkv.chunk(3, dim=-1)
        return torch.softmax(q @ k.transpose(1, 2) / self.d ** 0.5, dim=-1) @ v

    def forward(self, x):
        img = self.img_in(x)
        s1, c1, g1, s2, c2, g2, s3, c3, g3 = self.mod(x.mean(1, keepdim=True)).chunk(9, dim=-1)
        img += self.img_attn.proj(self.attention(self.img_attn.qkv(torch.addcmul(s1, self.img_norm1(img), 1 + c1))))\
            * g1
        img += self.img_mlp(torch.addcmul(s2, self.img_norm2(img), 1 + c2)) * g2
        qkv, mlp = torch.split(self.linear1(torch.addcmul(s3, self.pre_norm(img), 1 + c3)), [3 * self.d, self.h], -1)
        img += self.linear2(torch.cat((self.attention(qkv), F.gelu(mlp, approximate="tanh")), 2)) * g3
        return img


def _quantized(module, backend, seed=0):
    torch.manual_seed(seed)
    net = module().eval()
    octet.quantize_(net, octet.DynamicW8A8Config(backend=backend))
    return net


def _compiled_with_pass(net, x):
    """net compiled by dynamo, the graph rewritten by the pass and run as is (no Inductor: the rewrite alone);
    returns (output, Counter of (input, gelu_out) per fused call, octet::linear calls left)."""
    kinds, plain = collections.Counter(), []

    def backend(gm, example_inputs):
        compile_pass.apply(gm.graph)
        gm.recompile()
        for n in gm.graph.nodes:
            if n.op == "call_function" and n.target is torch.ops.octet.linear_fused.default:
                kinds[(n.args[5], n.args[6]) + (() if n.args[7] is None else ("residual",))] += 1
            elif n.op == "call_function" and n.target in compile_pass._linear_targets():
                plain.append(n)
        return gm.forward
    torch._dynamo.reset()
    try:
        y = torch.compile(net, backend=backend, fullgraph=True)(x)
    finally:
        torch._dynamo.reset()
    return y, kinds, len(plain)


@pytest.fixture
def entries(monkeypatch):
    """Counts of the W8A8 plans' deferred-input entries called ("gelu", "norm"), eager or compiled."""
    counts = collections.Counter()
    real_gelu, real_norm = triton_backend._W8A8Linear.gelu_input, triton_backend._W8A8Linear.norm_input
    monkeypatch.setattr(triton_backend._W8A8Linear, "gelu_input",
                        lambda self, *a: counts.update(["gelu"]) or real_gelu(self, *a))
    monkeypatch.setattr(triton_backend._W8A8Linear, "norm_input",
                        lambda self, *a: counts.update(["norm"]) or real_norm(self, *a))
    return counts


@needs_triton
def test_the_flux_patterns_become_fused_calls_with_eager_octets_numbers(rng, entries):
    net = _quantized(FluxLike, "triton")
    x = torch.randn(2, 7, 24, generator=rng)
    with torch.no_grad():
        eager = net(x)
        eager_entries = dict(entries)
        entries.clear()
        compiled, kinds, plain = _compiled_with_pass(net, x)
    # linear1 takes its modulated LayerNorm, linear2 the cat + GELU, the MLP's fc1 its norm2 with the GELU in its
    # epilogue; left as octet::linear: the two modulations and fc2.
    assert kinds == {("norm", False): 1, ("gelu", False): 1, ("norm", True): 1} and plain == 3
    # Through the same kernels as eager (octet/deferred.py's entries, fusion.py's epilogue): the same numbers.
    assert eager_entries == {"gelu": 1, "norm": 2} and dict(entries) == eager_entries
    assert torch.equal(compiled, eager)


@needs_triton
def test_flux_gated_residuals_go_into_the_layers_epilogues_with_eager_octets_numbers(rng, monkeypatch):
    """proj's, fc2's and linear2's ``img += out * gate`` become their layer's residual epilogue (fused with linear2's
    cat + GELU input), rounded as the host's mul and add: the compiled output is eager's to the bit. Here in fp32
    (the CPU interpreter), where the layer takes the epilogue only because this test lets it (a GPU may contract
    fp32's two roundings into one fused multiply-add; on a GPU bf16 takes it: the GPU test below)."""
    calls = []
    real = triton_backend._W8A8Linear._residual        # every residual epilogue's call (host_rounding last)
    monkeypatch.setattr(triton_backend._W8A8Linear, "_residual",
                        lambda self, *a, **kw: calls.append(kw.get("host_rounding", a[-1])) or real(self, *a, **kw))
    monkeypatch.setattr(modules, "_takes_residual", lambda run, x, res, gate: run.takes_residual(x, res, gate))
    monkeypatch.setenv("OCTET_COMPILE_RESIDUAL", "1")
    net = _quantized(GatedFlux, "triton")
    x = torch.randn(2, 7, 24, generator=rng)
    with torch.no_grad():
        eager = net(x)
        assert not calls                                        # eager Flux adds its residuals as the host does
        compiled, kinds, plain = _compiled_with_pass(net, x)
    assert kinds == {("norm", False): 2, ("plain", False, "residual"): 2, ("norm", True): 1,
                     ("gelu", False, "residual"): 1} and plain == 2
    assert calls == [True] * 3
    assert torch.equal(compiled, eager)
    # By default (OCTET_COMPILE_RESIDUAL unset: no faster on an H100) the inputs are fused, the residuals the host's.
    monkeypatch.delenv("OCTET_COMPILE_RESIDUAL")
    with torch.no_grad():
        compiled, kinds, plain = _compiled_with_pass(net, x)
    assert kinds == {("norm", False): 2, ("norm", True): 1, ("gelu", False): 1} and plain == 4
    assert calls == [True] * 3 and torch.equal(compiled, eager)


def test_a_residual_anything_else_sees_stays_the_hosts_in_place_add(rng, monkeypatch):
    """The sum goes to a new tensor only where nobody could see the difference: not where the residual is read after
    the add through another name, is the graph's input (the caller sees it change), or is a view of another tensor;
    the one residual made by an INT8 layer and read by nothing else is rewritten."""
    class Aliased(nn.Module):
        def __init__(self, d=16):
            super().__init__()
            self.inp, self.a, self.b, self.c = (nn.Linear(d, d) for _ in "abcd")
            self.g = nn.Parameter(torch.linspace(0.5, 1.5, d))

        def forward(self, x):
            h = self.inp(x)
            alias = h
            h += self.a(h) * self.g                 # read after the add as ``alias``
            x += self.b(x) * self.g                 # the graph's input
            v = self.inp(x)[:, 1:]
            v += self.c(v) * self.g                 # a view
            w = self.inp(h)
            w += (self.g * 1.5) * self.a(w)         # rewritten (the gate first, read only here)
            return h + alias + v.sum() + w
    monkeypatch.setenv("OCTET_COMPILE_RESIDUAL", "1")
    net = _quantized(Aliased, "torch")
    x = torch.randn(2, 6, 16, generator=rng)
    with torch.no_grad():
        eager_x, compiled_x = x.clone(), x.clone()
        eager = net(eager_x)
        compiled, kinds, plain = _compiled_with_pass(net, compiled_x)
    assert kinds == {("plain", False, "residual"): 1} and plain == 6
    assert torch.equal(compiled, eager) and torch.equal(compiled_x, eager_x) and not torch.equal(eager_x, x)


def test_the_fused_op_with_a_residual_is_the_hosts_in_place_add_without_the_mutation(rng):
    """``res += linear(x) * gate`` as octet::linear_fused computes it, with its layer or without (a graph that
    outlived its model): the host's numbers in bf16, as a new tensor, res untouched."""
    layer = modules.QuantLinear.from_float(nn.Linear(40, 12), "dynamic", backend="torch").to(torch.bfloat16)
    x = torch.randn(2, 5, 40, generator=rng).to(torch.bfloat16)
    res = torch.randn(2, 5, 12, generator=rng).to(torch.bfloat16)
    gate = torch.randn(2, 1, 12, generator=rng).to(torch.bfloat16)
    args = (layer.weight, layer.current_weight_scale(), layer.bias, None, None, "dynamic", "torch", "speed")
    before, expected = res.clone(), res.clone()
    expected += torch.ops.octet.linear(x, *args) * gate
    fused = torch.ops.octet.linear_fused.default
    with torch.no_grad():
        alone = fused(x, None, None, None, 0.0, "plain", False, res, gate, *args)
        owned = fused(x, None, None, None, 0.0, "plain", False, res, gate, *args, layer.op_owner)
    assert torch.equal(alone, expected) and torch.equal(owned, expected) and torch.equal(res, before)
    torch.library.opcheck(fused, (x, None, None, None, 0.0, "plain", False, res, gate, *args))


def test_only_float_tensors_nothing_else_reads_are_rewritten(rng, monkeypatch):
    """A LayerNorm output also read elsewhere, an affine LayerNorm, a cat on another dimension, the exact (erf)
    GELU, a GELU output that is not an INT8 layer's input: all stay as the host's ops."""
    class Declined(nn.Module):
        def __init__(self, d=16):
            super().__init__()
            self.ln = nn.LayerNorm(d, elementwise_affine=False)
            self.affine = nn.LayerNorm(d)
            self.a, self.b, self.c = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(2 * d, d)
            self.d, self.e = nn.Linear(d, d), nn.Linear(d, d)

        def forward(self, x):
            n = self.ln(x)
            y = self.a(n) + n                                           # n read twice
            y = self.b(self.affine(y))                                  # LayerNorm with weight and bias
            z = self.c(torch.cat((y, F.gelu(x, approximate="tanh")), 1).reshape(x.shape[0], -1, 2 * x.shape[-1]))
            z = self.d(F.gelu(z))                                       # exact GELU
            return F.gelu(self.e(z), approximate="tanh") * 2            # the GELU feeds a mul
    net = _quantized(Declined, "torch")
    x = torch.randn(2, 6, 16, generator=rng)
    with torch.no_grad():
        y, kinds, plain = _compiled_with_pass(net, x)
        assert not kinds and plain == 5 and torch.equal(y, net(x))
        # Switched off, the Flux patterns stay too.
        monkeypatch.setenv("OCTET_COMPILE_FUSIONS", "0")
        flux = _quantized(FluxLike, "torch")
        graphs = []

        def capture(gm, example_inputs):
            graphs.append(gm)
            return gm.forward
        torch._dynamo.reset()
        torch.compile(flux, backend=capture, fullgraph=True)(torch.randn(2, 7, 24, generator=rng))
        torch._dynamo.reset()
        pass_object = compile_pass._pass_class()()
        pass_object(graphs[0].graph)
        assert not any(n.target is torch.ops.octet.linear_fused.default for n in graphs[0].graph.nodes)
        monkeypatch.setenv("OCTET_COMPILE_FUSIONS", "1")
        pass_object(graphs[0].graph)
        assert sum(n.target is torch.ops.octet.linear_fused.default for n in graphs[0].graph.nodes) == 3


@pytest.mark.parametrize("input,gelu_out", [("gelu", False), ("norm", False), ("norm", True), ("plain", True)])
def test_the_fused_op_equals_the_hosts_float_ops_then_the_layer(rng, input, gelu_out):
    """Without its layer (a graph that outlived its model) the op computes the host's float ops, then the layer as
    octet::linear does; a plan without the fused entries (the exact torch backend) through the layer gives the same
    numbers."""
    layer = modules.QuantLinear.from_float(nn.Linear(40, 12), "dynamic", backend="torch")
    pre = torch.randn(2, 5, 40 if input != "gelu" else 32, generator=rng)
    head = torch.randn(2, 5, 8, generator=rng) if input == "gelu" else None
    mult, shift = (torch.randn(2, 1, 40, generator=rng), torch.randn(2, 1, 40, generator=rng)) \
        if input == "norm" else (None, None)
    if input == "gelu":
        float_input = torch.cat((head, F.gelu(pre, approximate="tanh")), -1)
    elif input == "norm":
        float_input = torch.addcmul(shift, F.layer_norm(pre, (40,), None, None, 1e-6), mult)
    else:
        float_input = pre
    args = (layer.weight, layer.current_weight_scale(), layer.bias, None, None, "dynamic", "torch", "speed")
    expected = torch.ops.octet.linear(float_input, *args)
    expected = F.gelu(expected, approximate="tanh") if gelu_out else expected
    fused = torch.ops.octet.linear_fused.default
    with torch.no_grad():
        alone = fused(pre, head, mult, shift, 1e-6, input, gelu_out, None, None, *args)
        owned = fused(pre, head, mult, shift, 1e-6, input, gelu_out, None, None, *args, layer.op_owner)
    assert torch.equal(alone, expected) and torch.equal(owned, expected)
    torch.library.opcheck(fused, (pre, head, mult, shift, 1e-6, input, gelu_out, None, None, *args))


def test_the_pass_is_installed_once_after_any_pass_already_there(monkeypatch):
    import torch._inductor.config as inductor_config
    seen = []

    class Previous:
        def __call__(self, graph):
            seen.append(graph)

        def uuid(self):
            return "previous-1"
    # Inductor's own patch (its config module is not a plain module: monkeypatch's undo would delete the entry).
    with inductor_config.patch(pre_grad_custom_pass=Previous()):
        monkeypatch.setattr(compile_pass, "_installed", False)
        compile_pass.install()
        installed = inductor_config.pre_grad_custom_pass
        monkeypatch.setattr(compile_pass, "_installed", False)    # a second copy of the pack: not installed twice
        compile_pass.install()
        assert inductor_config.pre_grad_custom_pass is installed and isinstance(installed.previous, Previous)
    on = installed.uuid()
    assert on.endswith("previous-1") and installed.uuid() == on
    # Inductor's cache keys on it: a compile with the switch off must not reuse a rewritten graph.
    monkeypatch.setenv("OCTET_COMPILE_FUSIONS", "0")
    assert installed.uuid() != on
    graph = torch.fx.Graph()
    graph.output(None)
    installed(graph)
    assert seen == [graph]


def test_the_installed_pass_pickles_as_its_uuid_for_inductors_cache_key(monkeypatch):
    """torch 2.11 pickles Inductor's whole config to hash a compile (H100 2026-12-06: "Can't pickle local object
    '_pass_class.<locals>.OctetFusions'" at every compile, the FX graph cache bypassed, bf16 models' compiles
    too): the pass pickles as its uuid, so equal switches give equal keys and a flipped switch another key."""
    import pickle
    import torch._inductor.config as inductor_config
    with inductor_config.patch(pre_grad_custom_pass=None):
        monkeypatch.setattr(compile_pass, "_installed", False)
        compile_pass.install()
        installed = inductor_config.pre_grad_custom_pass
        on = pickle.dumps(installed)
        assert pickle.dumps(installed) == on and installed.uuid().encode() in on
        assert pickle.loads(on) is installed
        monkeypatch.setenv("OCTET_COMPILE_RESIDUAL", "1")
        with_residuals = pickle.dumps(installed)
        assert with_residuals != on
        monkeypatch.setenv("OCTET_COMPILE_FUSIONS", "0")
        assert pickle.dumps(installed) not in (on, with_residuals)


def test_inductor_runs_the_pass_on_a_compiled_model(rng, monkeypatch):
    """torch.compile's default backend (the host's TorchCompileModel) applies the installed pass: the fused calls
    reach the layers, and the output is eager's up to Inductor's own float rounding."""
    import torch._inductor.config as inductor_config
    net = _quantized(FluxLike, "torch")       # made a QuantLinear: the pass is installed
    assert type(inductor_config.pre_grad_custom_pass).__name__ == "OctetFusions"
    calls = []
    real = modules.QuantLinear.fused_call
    monkeypatch.setattr(modules.QuantLinear, "fused_call",
                        lambda self, x, *a: calls.append((a[4], a[5])) or real(self, x, *a))
    x = torch.randn(2, 7, 24, generator=rng)
    with torch.no_grad():
        eager = net(x)
        torch._dynamo.reset()
        try:
            compiled = torch.compile(net)(x)
        finally:
            torch._dynamo.reset()
    assert sorted(calls) == [("gelu", False), ("norm", False), ("norm", True)]
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU half: Inductor's CUDA code around the kernels")
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_on_a_gpu_compiled_layers_take_the_fused_inputs_as_eager_does(rng, entries, monkeypatch, mode):
    """Flux-like widths in bf16 on the GPU, compiled as TorchCompileModel does (and with CUDA graphs): the fused
    inputs reach the same plan entries as eager's, and the output is eager's up to Inductor's float rounding of the
    ops around them (the attention's softmax, the modulations), which can move an int8 code by one step."""
    # These GEMMs are short: eager plans would decline the deferred inputs (triton_backend.deferral_pays), and the
    # test is about the compiled graph reaching the same entries as eager, so the plans take them.
    monkeypatch.setenv("OCTET_EAGER_DEFERRAL", "1")
    torch.manual_seed(0)
    net = FluxLike(512, 2048).to("cuda", torch.bfloat16).eval()
    octet.quantize_(net, octet.DynamicW8A8Config(backend="triton"))
    x = torch.randn(2, 1024, 512, generator=rng).to("cuda", torch.bfloat16)
    with torch.no_grad():
        eager = net(x)
        eager_entries = dict(entries)
        entries.clear()
        torch._dynamo.reset()
        try:
            compiled = torch.compile(net, mode=mode, fullgraph=True)
            outs = [compiled(x).clone() for _ in range(3)]
        finally:
            torch._dynamo.reset()
    assert eager_entries == {"gelu": 1, "norm": 2} and entries == {"gelu": 3, "norm": 6} or \
        (mode == "reduce-overhead" and entries["gelu"] >= 1 and entries["norm"] >= 2), (eager_entries, entries)
    for y in outs:
        err = (y.float() - eager.float()).abs().max().item()
        assert err <= 2e-2 * eager.float().abs().max().item(), err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU half: bf16 through the residual epilogue")
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_on_a_gpu_compiled_gated_residuals_run_in_the_epilogue_with_the_hosts_rounding(rng, monkeypatch, mode):
    """GatedFlux at Flux-like widths in bf16, compiled as TorchCompileModel does: its three gated residuals run in
    their layers' GEMM epilogues, rounded as the host's (the kernel's bit-exactness: tests/kernels/test_triton_gemm.py),
    and the output is eager's up to Inductor's float rounding of the other ops."""
    monkeypatch.setenv("OCTET_EAGER_DEFERRAL", "1")
    monkeypatch.setenv("OCTET_COMPILE_RESIDUAL", "1")
    calls = []
    real = triton_backend._W8A8Linear._residual        # every residual epilogue's call (host_rounding last)
    monkeypatch.setattr(triton_backend._W8A8Linear, "_residual",
                        lambda self, *a, **kw: calls.append(kw.get("host_rounding", a[-1])) or real(self, *a, **kw))
    torch.manual_seed(0)
    net = GatedFlux(512, 2048).to("cuda", torch.bfloat16).eval()
    octet.quantize_(net, octet.DynamicW8A8Config(backend="triton"))
    x = torch.randn(2, 1024, 512, generator=rng).to("cuda", torch.bfloat16)
    with torch.no_grad():
        eager = net(x.clone())
        assert not calls
        torch._dynamo.reset()
        try:
            compiled_net = torch.compile(net, mode=mode, fullgraph=True)
            outs = [compiled_net(x.clone()).clone() for _ in range(3)]    # with CUDA graphs: warm-up, record, replay
        finally:
            torch._dynamo.reset()
    assert calls[:3] == [True] * 3 and set(calls) == {True}
    for y in outs:
        err = (y.float() - eager.float()).abs().max().item()
        assert err <= 2e-2 * eager.float().abs().max().item(), err


# A stand-in for 0.29's comfy_kitchen::apply_rope (the pass knows the host's op by its namespace and name),
# computing comfy.ldm.flux.math's fp32 RoPE as that op does.
_ROPE_LIB = torch.library.Library("comfy_kitchen_octet_test", "FRAGMENT")
_ROPE_LIB.define("apply_rope(Tensor q, Tensor k, Tensor freqs) -> (Tensor, Tensor)")
_ROPE_LIB.impl("apply_rope", lambda q, k, f: (torch_ref.rope(q, f), torch_ref.rope(k, f)), "CompositeExplicitAutograd")
torch.library.register_fake("comfy_kitchen_octet_test::apply_rope", lambda q, k, f: (torch.empty_like(q),
                                                                                   torch.empty_like(k)), lib=_ROPE_LIB)


class DoubleAttention(nn.Module):
    """Flux's double block from its qkv views to the RoPE: QKNorm per stream (.to(v)), the streams' cat, RoPE."""

    def __init__(self, d=16, share_norm_output=False):
        super().__init__()
        self.norms = nn.ModuleList(nn.RMSNorm(d) for _ in range(4))
        for i, n in enumerate(self.norms):
            n.weight.data = torch.linspace(0.5, 1.5, d) + i
        self.share = share_norm_output

    def forward(self, qkv_txt, qkv_img, freqs):
        streams = []
        for (q, k, v), (nq, nk) in zip((qkv_txt.unbind(0), qkv_img.unbind(0)), (self.norms[:2], self.norms[2:])):
            qn, kn = nq(q), nk(k)
            streams.append((qn.to(v), kn.to(v), v, qn))
        q = torch.cat((streams[0][0], streams[1][0]), dim=2)
        k = torch.cat((streams[0][1], streams[1][1]), dim=2)
        q, k = torch.ops.comfy_kitchen_octet_test.apply_rope(q, k, freqs)
        out = q + k
        return out + streams[0][3].sum() if self.share else out


def _flux_freqs(length, d, rng):
    angles = torch.rand(1, 1, length, d // 2, generator=rng) * 6.28
    cos, sin = angles.cos(), angles.sin()
    return torch.stack((cos, -sin, sin, cos), dim=-1).reshape(1, 1, length, d // 2, 2, 2)


@pytest.mark.parametrize("shared", [False, True], ids=["fused", "norm-output-read-twice"])
def test_flux_qk_preparation_becomes_one_op_with_the_hosts_numbers(rng, shared):
    """QKNorm per stream + cat + the host's RoPE -> octet::qk_norm_rope (eager Octet's q/k kernel, or the host's
    ops where the kernel does not run): the same attention inputs up to the kernel's fp32 rounding; a norm output
    read elsewhere stays as the host's ops."""
    module = DoubleAttention(16, shared)
    qkv_txt, qkv_img = torch.randn(3, 2, 4, 5, 16, generator=rng), torch.randn(3, 2, 4, 11, 16, generator=rng)
    freqs = _flux_freqs(16, 16, rng)
    rewritten = []

    def backend(gm, example_inputs):
        rewritten.append(compile_pass.apply(gm.graph)[1])
        gm.recompile()
        return gm.forward
    with torch.no_grad():
        eager = module(qkv_txt, qkv_img, freqs)
        torch._dynamo.reset()
        try:
            compiled = torch.compile(module, backend=backend, fullgraph=True)(qkv_txt, qkv_img, freqs)
        finally:
            torch._dynamo.reset()
    assert rewritten == [0 if shared else 1]
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("d", [16, 6], ids=["kernel", "host-ops"])
def test_the_qk_op_equals_the_hosts_norms_cat_and_rope(rng, monkeypatch, caplog, d):
    qs = [torch.randn(2, 3, n, d, generator=rng) for n in (4, 7)]
    ks = [torch.randn(2, 3, n, d, generator=rng) for n in (4, 7)]
    ws = [torch.rand(d, generator=rng) + 0.5 for _ in range(4)]
    freqs = _flux_freqs(11, d, rng)
    eps = [1e-6, 1e-5]
    from comfyui_octet.kernels.backends import triton_rope
    kernel = triton_rope.qk_norm_rope
    launched = []
    monkeypatch.setattr(triton_rope, "qk_norm_rope", lambda *a: launched.append(1) or kernel(*a))

    def host(xs, wl):
        x = torch.cat([F.rms_norm(x, (d,), w, e) for x, w, e in zip(xs, wl, eps)], dim=2)
        return torch_ref.rope(x, freqs)
    op = torch.ops.octet.qk_norm_rope.default
    args = (qs, ks, ws[:2], ws[2:], eps, eps, freqs, torch.float32)
    from comfyui_octet.kernels import registry
    registry._logged.discard("compiled-qk-host")     # logged once a process: not this test's order's business
    with caplog.at_level(logging.INFO, logger="octet"):
        q, k = op(*args)
    from comfyui_octet.kernels.backends import triton_support
    kernel_runs = d != 6 and triton_support.interpreting() and triton_support.unavailable_reason() is None
    assert launched == ([1] if kernel_runs else [])
    logged = [r.getMessage() for r in caplog.records if "q/k norm + RoPE ran as the host's ops" in r.getMessage()]
    assert len(logged) == (0 if kernel_runs else 1) and all(f"(2, 3, 4, {d})" in m for m in logged)
    if not kernel_runs:      # D not a power of two (or no Triton): the host's own ops run, said once
        assert torch.equal(q, host(qs, ws[:2])) and torch.equal(k, host(ks, ws[2:]))
    else:
        torch.testing.assert_close(q, host(qs, ws[:2]), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(k, host(ks, ws[2:]), rtol=1e-5, atol=1e-5)
    torch.library.opcheck(op, args)


@needs_triton
def test_a_declined_norm_input_is_computed_in_one_float_pass_on_a_gpu(rng, monkeypatch):
    """A plan that declines the norm input (here the exact torch backend, which has none; on a GPU, short GEMMs)
    gets its LayerNorm + modulation from one float kernel pass (what Inductor's fused kernel was) where the kernels
    run on a GPU, then the layer's plan; the CPU keeps the host's two ops. Stood in here by the interpreter."""
    from comfyui_octet.kernels.backends import triton_layernorm
    kernel = triton_layernorm.NormModulate()
    calls = []

    def on_gpu(x):    # _float_norm_kernel as on a GPU
        return kernel
    monkeypatch.setattr(modules, "_float_norm_kernel", on_gpu)
    real = triton_layernorm.NormModulate.__call__
    monkeypatch.setattr(triton_layernorm.NormModulate, "__call__",
                        lambda self, *a: calls.append(1) or real(self, *a))
    layer = modules.QuantLinear.from_float(nn.Linear(32, 12), "dynamic", backend="torch")
    x, mult, shift = (torch.randn(2, 5, 32, generator=rng), torch.randn(2, 1, 32, generator=rng),
                      torch.randn(2, 1, 32, generator=rng))
    args = (layer.weight, layer.current_weight_scale(), layer.bias, None, None, "dynamic", "torch", "speed")
    with torch.no_grad():
        y = torch.ops.octet.linear_fused.default(x, None, mult, shift, 1e-6, "norm", False, None, None, *args,
                                                 layer.op_owner)
        one_pass = real(kernel, x, 1e-6, mult, shift)
    assert calls == [1]
    assert torch.equal(y, torch.ops.octet.linear(one_pass, *args))
    host = torch.addcmul(shift, F.layer_norm(x, (32,), None, None, 1e-6), mult)
    torch.testing.assert_close(one_pass, host, rtol=1e-5, atol=1e-5)
