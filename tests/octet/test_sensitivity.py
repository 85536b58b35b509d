"""Sensitivity ranking and budgets on small torch models with fresh (OS-seeded) weights and inputs."""
import math

import pytest
import torch
import torch.nn as nn

from comfyui_octet.octet import config_for_mode, quantize_
from comfyui_octet.octet.api import OctetError
from comfyui_octet.octet.policy import Policy, Rule
from comfyui_octet.octet.sensitivity import measure, psnr, select, sensitivity_policy

WO = config_for_mode("weight_only", backend="torch")
DYN = config_for_mode("dynamic", backend="torch")


class Net(nn.Module):
    """A conv stem, a stack of linear blocks with residuals, a linear head: enough layers to rank."""

    def __init__(self, g, width=48, depth=6):
        super().__init__()
        self.stem = nn.Conv2d(4, width, 3, padding=1)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
                                    for _ in range(depth))
        self.head = nn.Linear(width, 4)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel() if p.dim() > 1 else 50))

    def forward(self, x):
        h = self.stem(x).flatten(2).transpose(1, 2)
        for b in self.blocks:
            h = h + b(h)
        return self.head(h)


def make(g):
    net = Net(g)
    xs = [torch.randn(2, 4, 6, 6, generator=g) for _ in range(3)]  # three fixed "timesteps"
    return net, (lambda: torch.cat([net(x) for x in xs]))


def plant_outlier(net, g):
    """Huge weights in one input column of a random block's down-projection, fed by a channel that is
    silenced upstream: the float output is unchanged, but every row's INT8 scale is now set by the
    outlier and the layer's real weights round to almost nothing. The classic outlier failure."""
    i = int(torch.randint(0, len(net.blocks), (1,), generator=g))
    up, down = net.blocks[i][0], net.blocks[i][2]
    c = int(torch.randint(0, down.in_features, (1,), generator=g))
    with torch.no_grad():
        up.weight[c] = 0.0
        up.bias[c] = -20.0  # GELU(-20) == 0 in float32
        down.weight[:, c] = 300 * down.weight.abs().max()
    return f"blocks.{i}.2"


@pytest.mark.parametrize("config", [WO, DYN], ids=["weight_only", "dynamic"])
def test_planted_outlier_ranks_first(rng, config):
    net, run = make(rng)
    planted = plant_outlier(net, rng)
    result = measure(net, run, config)
    assert result.units[0].name == planted, [(u.name, round(u.psnr, 1)) for u in result.units[:4]]
    assert result.units[0].psnr < result.units[1].psnr


def test_ranking_is_deterministic_and_model_is_restored(rng):
    seed = int(torch.randint(0, 2**31, (1,), generator=rng))
    net, run = make(torch.Generator().manual_seed(seed))
    before = run()
    modules = dict(net.named_modules())
    a = measure(net, run, DYN)
    b = measure(net, run, DYN)
    twin, twin_run = make(torch.Generator().manual_seed(seed))
    c = measure(twin, twin_run, DYN)
    for other in (b, c):
        assert [(u.name, u.mse) for u in a.units] == [(u.name, u.mse) for u in other.units]
    assert torch.equal(run(), before) and dict(net.named_modules()) == modules


def test_base_policy_layers_are_not_measured_and_blocks_group(rng):
    net, run = make(rng)
    base = Policy(name="b", rules=[Rule("stem", "keep"), Rule("head", "keep")])
    r = measure(net, run, WO, base=base, block_depth=2)
    assert set(r.skipped) == {"stem", "head"}
    assert sorted(u.name for u in r.units) == [f"blocks.{i}" for i in range(6)]
    assert all(len(u.layers) == 2 for u in r.units)


def test_max_float_share_budget_is_respected(rng):
    net, run = make(rng)
    plant_outlier(net, rng)
    result = measure(net, run, DYN)
    total = result.total_params
    for share in (0.0, 0.05, 0.3, 1.0):
        keep = set(select(result, "max_float_share", share))
        kept = sum(u.params for u in result.units if u.name in keep)
        assert kept <= share * total
    assert select(result, "max_float_share", 0.0) == []
    assert result.units[0].name in select(result, "max_float_share", 0.3)  # the outlier layer is cheap to keep
    with pytest.raises(OctetError, match="share in"):
        select(result, "max_float_share", 5)


def test_float_budget_counts_the_layers_the_base_policy_keeps(rng):
    """Issue 15: "<= 10 % float" must mean 10 % of the weights, the preset's float layers included."""
    net, run = make(rng)
    plant_outlier(net, rng)
    base = Policy(name="b", rules=[Rule("stem", "keep"), Rule("head", "keep")])
    result = measure(net, run, DYN, base=base)
    preset = sum(net.get_submodule(n).weight.numel() + net.get_submodule(n).bias.numel() for n in ("stem", "head"))
    assert result.skipped_params == preset and result.quantizable_params == result.total_params + preset
    for share in (0.1, 0.3, 0.6):
        _, _, summary = sensitivity_policy(net, run, DYN, "max_float_share", share, base=base, check=False)
        keep = set(select(result, "max_float_share", share))
        kept = sum(u.params for u in result.units if u.name in keep)
        assert summary["float_params"] == kept + preset
        assert summary["float_share"] == pytest.approx((kept + preset) / result.quantizable_params)
        assert summary["float_share"] <= share or (not keep and "over_budget" in summary)
        assert summary["float_share_of_model"] <= summary["float_share"] + 1e-12  # more parameters in the model
    # A budget the preset alone exceeds: nothing more is kept, and the report says so.
    _, _, tight = sensitivity_policy(net, run, DYN, "max_float_share", 0.0, base=base, check=False)
    assert tight["kept_units"] == 0 and "over_budget" in tight


def test_min_psnr_budget_is_met_on_the_real_model(rng):
    net, run = make(rng)
    plant_outlier(net, rng)
    ref = run()
    full = measure(net, run, DYN)
    all_q = psnr(ref, _quantized_output(net, run, Policy()))
    target = all_q + 12.0  # clearly above what plain INT8 gives
    policy, result, summary = sensitivity_policy(net, run, DYN, "min_psnr", target)
    assert summary["measured_psnr"] >= target
    assert psnr(ref, _quantized_output(net, run, policy)) == pytest.approx(summary["measured_psnr"])
    assert 0 < summary["kept_units"] < len(full.units)
    assert torch.equal(run(), ref)


def test_a_bigger_share_keeps_more_and_does_not_hurt_quality(rng):
    net, run = make(rng)
    plant_outlier(net, rng)
    ref = run()
    small, _, s1 = sensitivity_policy(net, run, DYN, "max_float_share", 0.02)
    big, _, s2 = sensitivity_policy(net, run, DYN, "max_float_share", 0.25)
    assert len(big.overrides) >= len(small.overrides)
    assert s2["measured_psnr"] >= s1["measured_psnr"] - 0.5
    assert s2["float_share"] <= 0.25


def _quantized_output(net, run, policy):
    q = quantize_(net, DYN, policy=policy, inplace=False)
    originals = {n: net.get_submodule(n) for n in q.replacements}
    for n, m in q.replacements.items():
        net.set_submodule(n, m)
    try:
        return run()
    finally:
        for n, m in originals.items():
            net.set_submodule(n, m)
