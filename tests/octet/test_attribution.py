"""Per-layer attribution: static vs dynamic error per timestep group, the statistics behind it, auto choice."""
import pytest
import torch
import torch.nn as nn

from comfyui_octet.octet import StaticW8A8Config, quantize_
from comfyui_octet.octet.attribution import attribute, auto_policy
from comfyui_octet.octet.calibration import record
from comfyui_octet.octet.timestep import GroupSelector

SIGMAS = [8.0, 4.0, 2.0, 1.0, 0.5, 0.25]


class Modulated(nn.Module):
    """A token MLP plus a modulation layer whose single row per sample moves with sigma (like adaLN on a
    timestep embedding): one static scale must cover 1e-3..1e0, a dynamic one fits each call."""

    def __init__(self, g):
        super().__init__()
        self.mlp = nn.Linear(16, 16)
        self.mod = nn.Linear(16, 16)
        with torch.no_grad():
            for lin in (self.mlp, self.mod):
                lin.weight.copy_(torch.randn(16, 16, generator=g) / 4)
                lin.bias.zero_()

    def forward(self, x, emb):
        # The modulation's output is normalised downstream (as adaLN's is, by the next norm), so its relative
        # error counts whatever the row's magnitude.
        m = self.mod(emb)
        return self.mlp(x) + (m / m.norm(dim=-1, keepdim=True).clamp_min(1e-6))[:, None, :]


def _setup(seed=0):
    g = torch.Generator().manual_seed(seed)
    net = Modulated(g).eval()
    xs = [torch.randn(2, 8, 16, generator=g) for _ in SIGMAS]
    # Per-sample rows whose magnitude moves with sigma (1e-4..1) and differs between the two samples (x30).
    embs = [torch.randn(2, 16, generator=g) * torch.tensor([[1.0], [1 / 30]]) * s ** 3 / 512 for s in SIGMAS]

    def evaluate(i):
        return net(xs[i], embs[i])
    selector = GroupSelector.from_sigmas(SIGMAS, 2)
    with torch.no_grad(), record(net, selector) as cal:
        for i, s in enumerate(SIGMAS):
            selector.select(s)
            evaluate(i)
    return net, evaluate, cal


def test_attribution_finds_the_modulation_layer_and_auto_makes_it_dynamic():
    net, evaluate, cal = _setup()
    config = StaticW8A8Config(observer="minmax", timestep_groups=True)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    result = attribute(net, evaluate, SIGMAS, config, cal)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())  # model restored
    assert [a.name for a in result.layers][0] == "mod" and result.groups == 2  # the most costly when static
    mod = next(a for a in result.layers if a.name == "mod")
    mlp = next(a for a in result.layers if a.name == "mlp")
    assert mod.gap_db > 6 > mlp.gap_db  # static costs far more than dynamic on the modulation input only
    assert mod.rows_per_call == pytest.approx(2.0) and mlp.rows_per_call == pytest.approx(16.0)
    assert mod.absmax[1] > 100 * mod.absmax[0]  # its range moves with the noise level: the cause, in numbers
    policy, chosen = auto_policy(result, margin_db=4.0)
    assert chosen == {"mod": "dynamic", "mlp": "static"}
    # One row per sample (modulation-like): dynamic even where it measures fine, unless that rule is off.
    assert auto_policy(result, margin_db=100.0)[1] == {"mod": "dynamic", "mlp": "static"}
    assert auto_policy(result, margin_db=100.0, per_sample_dynamic=False)[1] == {"mod": "static", "mlp": "static"}

    def err(policy):
        q = quantize_(net, config, policy=policy, calibration=cal, inplace=False)
        originals = {n: net.get_submodule(n) for n in q.replacements}
        try:
            for n, layer in q.replacements.items():
                net.set_submodule(n, layer)
            total = 0.0
            with torch.no_grad():
                for i, s in enumerate(SIGMAS):
                    cal.selector.select(s)
                    out = evaluate(i)
                    for n, layer in originals.items():
                        net.set_submodule(n, layer)
                    total += float((out - evaluate(i)).square().mean())
                    for n, layer in q.replacements.items():
                        net.set_submodule(n, layer)
        finally:
            for n, layer in originals.items():
                net.set_submodule(n, layer)
        return total

    assert err(policy) < 0.5 * err(None)
