"""QAT core: fake quantization matches the INT8 kernels, gradients flow, fold is faithful, loss falls."""
import copy

import pytest
import torch
import torch.nn as nn

from comfyui_octet import octet
from comfyui_octet.octet import qat
from comfyui_octet.octet.api import OctetError, swapped
from comfyui_octet.octet.modules import QuantConv2d, QuantLinear


def _linear(rng, k=37, n=23):
    lin = nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=rng) / k ** 0.5)
        lin.bias.copy_(torch.randn(n, generator=rng) * 0.1)
    return lin


def _conv(rng, c=6, o=10, groups=1):
    conv = nn.Conv2d(c, o, 3, stride=2, padding=1, groups=groups)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=rng) * 0.3)
        conv.bias.copy_(torch.randn(o, generator=rng) * 0.1)
    return conv


def _layer_and_input(rng, kind, act, smooth):
    if kind == "linear":
        fl = _linear(rng)
        x = torch.randn(3, 5, fl.in_features, generator=rng) * 2
        channels = fl.in_features
    else:
        fl = _conv(rng, groups=2 if kind == "conv_groups" else 1)
        x = torch.randn(2, fl.in_channels, 9, 11, generator=rng)
        channels = fl.in_channels
    s = torch.rand(channels, generator=rng) + 0.5 if smooth else None
    cls = QuantLinear if kind == "linear" else QuantConv2d
    q = cls.from_float(fl, act, backend="torch", smooth=s)
    if act == "static":
        q.set_static_scales(torch.tensor([float(x.abs().max()) / 127 * 0.7]))  # clips the largest inputs
    return fl, q, x


CASES = [("linear", "dynamic", False), ("linear", "static", False), ("linear", "dynamic", True),
         ("linear", "static", True), ("linear", "none", False), ("conv", "dynamic", False),
         ("conv", "static", True), ("conv_groups", "dynamic", False), ("conv", "none", False)]


@pytest.mark.parametrize("kind,act,smooth", CASES)
def test_fake_quant_forward_equals_the_real_int8_layer(rng, kind, act, smooth):
    fl, q, x = _layer_and_input(rng, kind, act, smooth)
    twin = qat.fake_quant_twin(q, fl.weight)
    # The twin picks the very integer grid points the PTQ layer stores...
    w = twin.merged_weight()
    grid = torch.round(w / twin.weight_scale().reshape((-1,) + (1,) * (w.dim() - 1)))
    assert torch.equal(grid.to(torch.int8), q.weight)
    # ...and its float forward is the INT8 kernels' output up to float summation order.
    real, fake = q(x), twin(x)
    assert fake.shape == real.shape and fake.dtype == real.dtype
    torch.testing.assert_close(fake, real, rtol=1e-4, atol=1e-4 * float(real.abs().max()))
    # Starting from the dequantized int8 weight (no float model at hand) gives the same layer.
    torch.testing.assert_close(qat.fake_quant_twin(q)(x), real, rtol=1e-4, atol=1e-4 * float(real.abs().max()))


def test_fake_quant_is_not_the_float_layer(rng):
    """Guard against a vacuous equality above: the fake path really quantizes."""
    fl, q, x = _layer_and_input(rng, "linear", "static", False)
    twin = qat.fake_quant_twin(q, fl.weight)
    assert not torch.allclose(twin(x), fl(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind,act", [("linear", "static"), ("conv", "static"), ("linear", "dynamic")])
def test_straight_through_gradients_reach_scales_lora_and_inputs(rng, kind, act):
    fl, q, x = _layer_and_input(rng, kind, act, False)
    twin = qat.fake_quant_twin(q, fl.weight, rank=3)
    with torch.no_grad():  # B starts at 0, which stops A's gradient; move it off zero
        twin.lora_b.normal_(0, 1e-3, generator=rng)
    x = x.clone().requires_grad_(True)
    twin(x).square().sum().backward()
    grads = {"x": x.grad, "weight scale": twin.log_weight_scale.grad, "lora A": twin.lora_a.grad,
             "lora B": twin.lora_b.grad}
    if act == "static":
        grads["input scale"] = twin.log_input_scale.grad
    for name, g in grads.items():
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, name
    # Frozen means frozen: the float weight and bias are buffers without gradients.
    assert not twin.latent_weight.requires_grad and not twin.bias.requires_grad
    # STE: dL/dW_latent equals dL/dW_fake inside the clamp range and is zero outside it.
    w = twin.merged_weight().detach().requires_grad_(True)
    scale = twin.weight_scale().detach().reshape((-1,) + (1,) * (w.dim() - 1)) * 0.5  # forces clipping
    wq = qat.fake_quant(w, scale)
    (wq * 3).sum().backward()
    inside = (w / scale).abs() <= 127
    assert inside.any() and (~inside).any()
    torch.testing.assert_close(w.grad[inside], torch.full_like(w[inside], 3.0))
    assert torch.equal(w.grad[~inside], torch.zeros_like(w[~inside]))


@pytest.mark.parametrize("kind,act,smooth", [("linear", "static", True), ("conv", "dynamic", False),
                                             ("conv", "static", False), ("linear", "none", False)])
def test_fold_gives_a_real_int8_layer_that_computes_what_the_trained_twin_did(rng, kind, act, smooth):
    fl, q, x = _layer_and_input(rng, kind, act, smooth)
    twin = qat.fake_quant_twin(q, fl.weight, rank=2)
    with torch.no_grad():  # what training does: move scales and the low-rank correction
        twin.log_weight_scale.add_(torch.randn(twin.log_weight_scale.shape, generator=rng) * 0.1)
        twin.lora_b.normal_(0, 0.02, generator=rng)
        if twin.log_input_scale is not None:
            twin.log_input_scale.add_(0.2)
    folded = twin.fold()
    assert type(folded) is type(q) and folded.weight.dtype == torch.int8 and folded.act == q.act
    assert not torch.equal(folded.weight, q.weight)  # LoRA + new scales changed the integers
    if act == "static":
        torch.testing.assert_close(folded.input_scale, twin.input_scale().detach())
    if smooth:
        assert torch.equal(folded.pre_quant_scale, q.pre_quant_scale)
    real, fake = folded(x), twin(x).detach()
    torch.testing.assert_close(real, fake, rtol=1e-4, atol=1e-4 * float(fake.abs().max()))


def test_four_bit_weights_live_on_a_4_bit_grid_in_int8_containers(rng):
    fl, q, x = _layer_and_input(rng, "conv", "dynamic", False)
    q4 = qat.requantize({"c": q}, nn.ModuleDict({"c": fl}), 4)["c"]
    assert q4.weight.dtype == torch.int8 and int(q4.weight.abs().max()) == 7
    fp = fl(x)
    err8, err4 = (q(x) - fp).square().mean(), (q4(x) - fp).square().mean()
    assert err4 > 4 * err8  # really coarser
    with pytest.raises(OctetError, match="weight_bits"):
        qat.QATConfig(weight_bits=3)


class Net(nn.Module):
    def __init__(self, rng):
        super().__init__()
        self.conv = _conv(rng, 4, 16)
        self.norm = nn.GroupNorm(4, 16)
        self.proj = _linear(rng, 16, 32)
        self.out = _linear(rng, 32, 8)

    def forward(self, x, scale=1.0):
        h = self.norm(self.conv(x)).mean((2, 3))
        return self.out(torch.nn.functional.gelu(self.proj(h))) * scale


def _ptq(net, act="dynamic", bits=8):
    layers = {}
    for name in ("conv", "proj", "out"):
        m = net.get_submodule(name)
        cls = QuantLinear if isinstance(m, nn.Linear) else QuantConv2d
        layers[name] = cls.from_float(m, act, backend="torch")
    return qat.requantize(layers, net, bits) if bits != 8 else layers


def test_distillation_lowers_the_loss_and_leaves_the_model_as_it_was():
    # A fixed seed: the verdict is on 4 set-aside calls, whose improvement varies with the draw (ratio
    # after/before 0.21-0.80 over seeds 0-19, 0.51 at seed 0), so an OS-seeded draw would make this flaky.
    rng = torch.Generator().manual_seed(0)
    net = Net(rng).eval()
    before = copy.deepcopy(net.state_dict())
    with qat.record_teacher(net) as teacher, torch.no_grad():
        for _ in range(12):
            net(torch.randn(8, 4, 12, 12, generator=rng), scale=2.0)
    assert len(teacher.calls) == 12 and teacher.calls[0].kwargs["scale"] == 2.0
    ptq = _ptq(net, bits=4)
    config = qat.QATConfig(steps=60, lr=1e-2, lora_rank=2, weight_bits=4, seed=0, eval_calls=4)
    twins = qat.make_twins(ptq, net, config)
    seen = []
    result = qat.distill(net, twins, teacher, config, progress=lambda i, n, loss: seen.append((i, n)))
    assert seen[-1] == (60, 60) and len(result.losses) == 60
    # Scored on the 4 calls that training never saw (held back).
    assert result.eval_after < 0.85 * result.eval_before, result.text()
    # The float model is back, unchanged and trainable as before.
    assert all(isinstance(net.get_submodule(n), (nn.Linear, nn.Conv2d)) for n in ("conv", "proj", "out"))
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.requires_grad for p in net.parameters())
    # The folded real INT8 layers score what the trained twins scored.
    folded = qat.fold(twins)
    with swapped(net, folded), torch.no_grad():
        mse = sum(float((net(*c.args, **c.kwargs) - c.target).square().mean()) for c in teacher.calls)
    with swapped(net, twins), torch.no_grad():
        mse_fake = sum(float((net(*c.args, **c.kwargs) - c.target).square().mean()) for c in teacher.calls)
    assert mse == pytest.approx(mse_fake, rel=1e-3)


def test_distillation_is_judged_on_held_back_calls_only():
    """Issue 15: QAT claimed gains on its own training calls while unseen images got worse. The verdict
    (``improved``, which decides keep-PTQ) must come from calls the training never saw."""
    rng = torch.Generator().manual_seed(0)  # fixed: held-back gains vary with the draw (0.49 at seed 0)
    net = Net(rng).eval()
    with qat.record_teacher(net) as teacher, torch.no_grad():
        for _ in range(12):
            net(torch.randn(8, 4, 12, 12, generator=rng))
    with qat.record_teacher(net) as holdout, torch.no_grad():
        for _ in range(3):
            net(torch.randn(8, 4, 12, 12, generator=rng))
    config = qat.QATConfig(steps=60, lr=1e-2, lora_rank=2, weight_bits=4, seed=1)
    good = qat.distill(net, qat.make_twins(_ptq(net, bits=4), net, config), teacher, config, holdout=holdout)
    assert good.improved and good.eval_after < 0.8 * good.eval_before and "held-back" in good.text(), good.text()
    # Held-back targets that the untrained quantized model already meets exactly (its own outputs): training
    # still lowers the training loss, but cannot lower the held-back error, and the result says so.
    twins = qat.make_twins(_ptq(net, bits=4), net, config)
    with swapped(net, twins), torch.no_grad():
        for c in holdout.calls:
            c.target = net(*c.args, **c.kwargs).clone()
    bad = qat.distill(net, twins, teacher, config, holdout=holdout)
    assert sum(bad.losses[-10:]) < 0.7 * sum(bad.losses[:10])
    assert not bad.improved, bad.text()


def test_distillation_works_on_a_model_built_under_inference_mode(rng):
    """ComfyUI runs every node under torch.inference_mode: weights, inputs and targets are inference
    tensors, which autograd refuses to save unless QAT stands in normal copies."""
    with torch.inference_mode():
        net = Net(rng).eval()
        ptq = _ptq(net, act="static")
        for layer in ptq.values():
            layer.set_static_scales(torch.tensor([0.05]))
        with qat.record_teacher(net) as teacher:
            for _ in range(3):
                net(torch.randn(4, 4, 8, 8, generator=rng))
        assert net.norm.weight.is_inference()
        config = qat.QATConfig(steps=5, lora_rank=2)
        result = qat.distill(net, qat.make_twins(ptq, net, config), teacher, config)
    assert len(result.losses) == 5 and net.norm.weight.is_inference()


def test_clear_errors():
    with pytest.raises(OctetError, match="no denoiser calls"):
        qat.distill(nn.Linear(2, 2), {"x": None}, qat.Teacher(), qat.QATConfig())
    with pytest.raises(OctetError, match="lora_rank"):
        qat.QATConfig(lora_rank=-1)


class InPlaceResidual(nn.Module):
    """The shape of ComfyUI's Flux blocks: a norm saves the stream, then the stream is updated in place."""

    def __init__(self, rng):
        super().__init__()
        self.embed = nn.Linear(16, 16)  # trainable in QAT, so the stream below needs gradients
        self.norm = nn.LayerNorm(16)
        self.fc = nn.Linear(16, 16)
        with torch.no_grad():
            self.embed.weight.copy_(torch.randn(16, 16, generator=rng) / 4)
            self.fc.weight.copy_(torch.randn(16, 16, generator=rng) / 4)

    def forward(self, x):
        x = self.embed(x)
        x += self.fc(self.norm(x))
        return x


def test_distillation_trains_through_in_place_residual_updates(rng):
    net = InPlaceResidual(rng).eval()
    ptq = octet.quantize_(net, octet.DynamicW8A8Config(), inplace=False).replacements
    with qat.record_teacher(net) as teacher, torch.no_grad():
        for _ in range(3):
            net(torch.randn(5, 16, generator=rng))
    config = qat.QATConfig(steps=4, lora_rank=2)
    result = qat.distill(net, qat.make_twins(ptq, net, config), teacher, config)
    assert len(result.losses) == 4 and all(torch.isfinite(torch.tensor(result.losses)))
