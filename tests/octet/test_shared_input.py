"""Linears that read one input run as one GEMM (octet/shared_input.py): an attention's q/k/v or a cross-
attention's k/v give the numbers of their own plans with one fused call, learn when the leader's input is not
the others', and rebuild when a member's weights change."""
import copy

import pytest
import torch
import torch.nn as nn

from comfyui_octet import octet
from comfyui_octet.octet import DynamicW8A8Config, StaticW8A8Config, WeightOnlyConfig
from comfyui_octet.octet.calibration import record
from comfyui_octet.octet.modules import plan_summary
from comfyui_octet.octet.timestep import GroupSelector


class Attention(nn.Module):
    """The host's CrossAttention call order: to_q(x), then to_k and to_v on ``context = default(context, x)``."""

    def __init__(self, dim, context_dim=None, names=("to_q", "to_k", "to_v")):
        super().__init__()
        self.names = names
        q, k, v = names
        setattr(self, q, nn.Linear(dim, dim, bias=False))
        setattr(self, k, nn.Linear(context_dim or dim, dim, bias=True))
        setattr(self, v, nn.Linear(context_dim or dim, dim, bias=False))
        self.out = nn.Linear(dim, dim)

    def forward(self, x, context=None):
        q, k, v = (getattr(self, n) for n in self.names)
        qx = q(x)
        context = x if context is None else context
        kx, vx = k(context), v(context)
        w = torch.softmax(qx @ kx.transpose(-1, -2) / 8, dim=-1)
        return self.out(w @ vx)


class Block(nn.Module):
    def __init__(self, names=("to_q", "to_k", "to_v")):
        super().__init__()
        self.attn1 = Attention(48, names=names)
        self.attn2 = Attention(48, 40 if names[0] == "to_q" else None, names=names)

    def forward(self, x, context):
        h = self.attn1(x)
        return self.attn2(h, context if context.shape[-1] == 40 or self.attn2.names[0] == "to_q" else context)


def _model(seed=0, names=("to_q", "to_k", "to_v")):
    torch.manual_seed(seed)
    return Block(names).eval()


def _inputs(context_width=40):
    g = torch.Generator().manual_seed(11)
    return torch.randn(2, 12, 48, generator=g), torch.randn(2, 5, context_width, generator=g)


def _ungrouped(model):
    """A copy whose layers run their own plans (a copy drops groups: they belong to the layers in place)."""
    return copy.deepcopy(model)


def _own_plans(model, *args):
    """``model``'s output with every layer on its own plan (groups detached for the call)."""
    members = _members(model)
    groups = [m.fused_group for m in members]
    try:
        for m in members:
            m.fused_group = None
        return model(*args)
    finally:
        for m, g in zip(members, groups):
            m.fused_group = g


def _members(model):
    return [m for m in model.modules() if isinstance(m, octet.modules.QuantLinear) and m.fused_group is not None]


def test_self_and_cross_attention_projections_run_as_one_gemm_with_their_own_plans_numbers():
    model = _model()
    result = octet.quantize_(model, DynamicW8A8Config())
    assert result.fused_groups == [["attn1.to_q", "attn1.to_k", "attn1.to_v"], ["attn2.to_k", "attn2.to_v"]]
    assert "2 attention q/k/v groups run as one GEMM each" in result.summary()
    reference = _ungrouped(model)
    assert not _members(reference)
    x, ctx = _inputs()
    with torch.no_grad():
        want = reference(x, ctx)
        for _ in range(2):
            got = model(x, ctx)
            # Same int8 codes, same per-token activation scales: the fused GEMM's blocks are the members' outputs.
            assert torch.equal(got, want)
    # The members never planned: every call went through their group's one fused layer.
    for m in _members(model):
        assert m._plans == {}
    assert model.attn2.to_q._plans != {}       # not in a group: its input (x) is not the context
    summary = plan_summary(model)["fused_groups"]
    assert set(summary) == {"attn1.to_q+attn1.to_k+attn1.to_v", "attn2.to_k+attn2.to_v"}
    assert summary["attn1.to_q+attn1.to_k+attn1.to_v"] >= 3 * 48 * 48     # at least the int8 weights side by side


def test_a_leader_whose_input_is_not_the_others_leaves_its_group():
    # Wan's cross-attention: q(x), then k and v on the context, all of one width.
    model = _model(names=("q", "k", "v"))
    octet.quantize_(model, DynamicW8A8Config())
    reference = _ungrouped(model)
    x, ctx = _inputs(context_width=48)
    assert model.attn2.q.fused_group is not None
    with torch.no_grad():
        want = reference(x, ctx)
        assert torch.equal(model(x, ctx), want)      # k missed q's blocks: k and v go on as a group of two
        assert model.attn2.q.fused_group is None
        assert model.attn2.k.fused_group is model.attn2.v.fused_group is not None
        for _ in range(2):
            assert torch.equal(model(x, ctx), want)
    # k and v fused from that first call on (it computes what every later one does): they never planned
    assert model.attn2.k._plans == {} and model.attn2.v._plans == {}
    assert model.attn1.q.fused_group is not None and model.attn1.q._plans == {}


def test_an_input_written_in_place_between_the_calls_runs_the_members_own_plans():
    model = _model()
    octet.quantize_(model, DynamicW8A8Config())
    attn = model.attn1
    x = _inputs()[0]
    with torch.no_grad():
        q = attn.to_q(x)
        x.mul_(2)       # the leader's kept blocks were for the old values
        k, v = attn.to_k(x), attn.to_v(x)
        reference = _ungrouped(model).attn1
        assert torch.equal(k, reference.to_k(x)) and torch.equal(v, reference.to_v(x))
        assert torch.equal(q, reference.to_q(x / 2))


def test_a_members_new_weight_rebuilds_the_fused_layer():
    model = _model()
    octet.quantize_(model, DynamicW8A8Config())
    x, ctx = _inputs()
    with torch.no_grad():
        model(x, ctx)
        # The host merges a LoRA into to_k (set_weight re-quantizes it in place).
        g = torch.Generator().manual_seed(5)
        model.attn1.to_k.set_weight(torch.randn(48, 48, generator=g) * 0.1, inplace_update=True)
        want = _own_plans(model, x, ctx)
        assert torch.equal(model(x, ctx), want)
        # ... or replaces the parameter.
        model.attn2.to_v.weight = nn.Parameter(torch.flip(model.attn2.to_v.weight, (0,)), requires_grad=False)
        want = _own_plans(model, x, ctx)
        assert torch.equal(model(x, ctx), want)
        # ... or writes a bias in place.
        model.attn2.to_k.bias.add_(0.5)
        want = _own_plans(model, x, ctx)
        assert torch.equal(model(x, ctx), want)
        # A per-call weight patch (LoRA under lowvram): that group's layers run their own (float) paths.
        model.attn1.to_v.weight_function = [lambda w: w * 2]
        want = _own_plans(model, x, ctx)
        assert torch.equal(model(x, ctx), want)
        assert model.attn1.to_v.fused_group._ready is None


def test_weight_only_and_static_layers_fuse_but_smoothquant_and_the_memory_goal_do_not():
    model = _model()
    assert len(octet.quantize_(model, WeightOnlyConfig()).fused_groups) == 2
    x, ctx = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(model(x, ctx), _ungrouped(model)(x, ctx), rtol=1e-5, atol=1e-5)
    assert octet.quantize_(_model(), WeightOnlyConfig(goal="memory")).fused_groups == []
    assert octet.quantize_(_model(), StaticW8A8Config(smooth_alpha=0.5), calibration=_calibration()).fused_groups == []


def test_static_layers_fuse_with_their_one_calibrated_scale_and_not_where_the_scales_differ():
    model = _model()
    result = octet.quantize_(model, StaticW8A8Config(timestep_groups=False), calibration=_calibration())
    assert len(result.fused_groups) == 2
    attn = model.attn1
    # Calibration saw one input for q, k and v: one range, one scale.
    assert torch.equal(attn.to_q.input_scale, attn.to_k.input_scale)
    x, ctx = _inputs()
    with torch.no_grad():
        got = model(x, ctx)
        assert attn.to_q._plans == {} and attn.to_q.fused_group._fused[1] is not None
        assert torch.equal(got, _own_plans(model, x, ctx))
        # Scales that differ (a file, a recalibration of one layer): each layer on its own plan and scale.
        attn.to_v.set_static_scales(attn.to_v.input_scale * 2)
        want = _own_plans(model, x, ctx)
        assert torch.equal(model(x, ctx), want)
        assert attn.to_q.fused_group._fused[1] is None


def _calibration():
    model, selector = _model(), GroupSelector([1.0])
    with torch.no_grad(), record(model, selector, architecture="test") as cal:
        for sigma in (0.5, 2.0):
            selector.select(sigma)
            model(*_inputs())
    return cal


def test_autograd_and_a_model_move_leave_no_fused_state_behind():
    model = _model()
    octet.quantize_(model, DynamicW8A8Config())
    x, ctx = _inputs()
    with torch.no_grad():
        model(x, ctx)
    group = model.attn1.to_q.fused_group
    assert group._fused is not None
    model.to(torch.float64).to(torch.float32)      # moved or cast: the fused copy belonged to the old tensors
    assert group._fused is None
    xg = x.clone().requires_grad_(True)
    y = model(xg, ctx)          # autograd: the members' own plans
    assert group._fused is None and y.requires_grad


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("tokens", [77, 4096])
def test_on_a_gpu_the_fused_gemm_gives_the_members_numbers_up_to_int8_rounding(tokens):
    """On a GPU the fused layer plans for N = 3n, where the cost model may pick INT8 though the members' n picks
    bf16 (or the reverse): outputs agree to INT8's error, and repeated calls (the scratch and kept blocks reused)
    give the same numbers."""
    torch.manual_seed(0)
    attn = Attention(640).cuda().to(torch.bfloat16).eval()
    octet.quantize_(attn, DynamicW8A8Config())
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(2, tokens, 640, generator=g, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        want = _own_plans(attn, x).float()
        first = attn(x)
        again = [attn(x) for _ in range(3)]
    torch.cuda.synchronize()
    assert all(torch.equal(first, y) for y in again)
    torch.testing.assert_close(first.float(), want, rtol=0, atol=0.03 * float(want.abs().max()))
    assert attn.to_q.fused_group._fused is not None


def test_a_leader_that_leaves_keeps_the_backend_its_first_call_ran_on(monkeypatch):
    """Wan's cross-attention on an H200: q alone planned the float path where the fused q/k/v (3x as wide) ran
    INT8, so a prompt's first step differed from the same step of its re-run (same seed, another image). The
    leader that leaves its group keeps the fused layer's backend at that signature."""
    from comfyui_octet.kernels import registry
    real_auto = registry._auto
    wide = []

    def auto(req):      # the float path for a layer alone, INT8 for the fused one: as the GPU's cost model chose
        wide.append(req.n)
        return registry.get("float") if req.n == 48 and req.m == 24 else real_auto(req)
    monkeypatch.setattr(registry, "_auto", auto)
    model = _model(names=("q", "k", "v"))
    octet.quantize_(model, DynamicW8A8Config())
    x, ctx = _inputs(context_width=48)
    with torch.no_grad():
        outs = [model(x, ctx) for _ in range(3)]
        q = model.attn2.q
        pinned = [p.impl.name for p in q._plans.values()]
        q._pinned.clear()
        q.invalidate()
        other = model(x, ctx)         # q on the float path its own plan picks: what the later calls gave before
    assert 144 in wide and all(torch.equal(y, outs[0]) for y in outs[1:])
    assert pinned == [p.impl.name for p in model.attn1.q.fused_group._ready[2]._plans.values()] != ["float"]
    assert [p.impl.name for p in q._plans.values()] == ["float"]
    # Pins outlive a plan's invalidation (a reload must not change the numbers), not a new format or goal.
    q.pin_backend(x.flatten(0, 1)[:24], pinned[0])
    q.invalidate()
    assert list(q._pinned.values()) == pinned
    q.goal = "memory"
    assert q._pinned == {}
    assert not torch.equal(other, outs[0])        # the test can tell: unpinned, q's numbers differ


def test_without_room_for_the_fused_weight_the_members_run_their_own_plans(monkeypatch):
    """The fused layer holds the members' int8 weights once more: not where that would leave less than ComfyUI's
    inference reserve free (kernels/vram.py)."""
    from types import SimpleNamespace

    from comfyui_octet.kernels import vram
    from comfyui_octet.octet import shared_input
    weight = SimpleNamespace(device=torch.device("cuda", 0), numel=lambda: 1 << 20, element_size=lambda: 1)
    members = [SimpleNamespace(weight=weight)] * 3
    monkeypatch.setattr(vram, "reserve", lambda device: 5 << 30)
    monkeypatch.setattr(vram, "free", lambda device: (5 << 30) + (3 << 20))
    assert shared_input._room_for_copy(members)
    monkeypatch.setattr(vram, "free", lambda device: (5 << 30) + (3 << 20) - 1)
    assert not shared_input._room_for_copy(members)

    monkeypatch.setattr(shared_input, "_room_for_copy", lambda members: False)
    model = _model()
    octet.quantize_(model, DynamicW8A8Config())
    reference = _ungrouped(model)
    x, ctx = _inputs()
    with torch.no_grad():
        want = reference(x, ctx)
        for _ in range(2):
            assert torch.equal(model(x, ctx), want)
    assert all(m._plans for m in _members(model))                       # each on its own plan, from the first call
    assert set(plan_summary(model)["fused_groups"].values()) == {0}      # no fused weight held
