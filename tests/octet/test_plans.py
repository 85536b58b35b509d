"""Plan once, replay cheaply: a layer's kernel plan per input signature, and when it is rebuilt."""
import torch

from comfyui_octet import kernels, octet
from comfyui_octet.kernels.backends import float_fallback
from comfyui_octet.octet.modules import QuantLinear, plan_summary


def _layer(rng, act="dynamic"):
    lin = torch.nn.Linear(32, 16)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(16, 32, generator=rng))
    return QuantLinear.from_float(lin, act), lin


def test_one_plan_per_signature_reused_across_calls(rng):
    layer, _ = _layer(rng)
    x = torch.randn(5, 32, generator=rng)
    first = layer.plan(x)
    assert layer.plan(x) is first
    assert layer.plan(torch.randn(7, 32, generator=rng)) is first            # same M bucket (8)
    assert layer.plan(torch.randn(9, 32, generator=rng)) is not first        # next bucket
    assert layer.plan(x.double()) is not first                               # another dtype
    assert len(layer._plans) == 3
    calls = []
    real = kernels.plan
    try:
        kernels.plan = lambda *a, **k: calls.append(1) or real(*a, **k)
        for _ in range(4):
            layer(x)
    finally:
        kernels.plan = real
    assert calls == []    # the hot path never plans again


def test_plan_is_rebuilt_when_the_weight_or_scales_change(rng):
    layer, lin = _layer(rng, act="static")
    layer.set_static_scales(torch.tensor([0.05, 0.1]))
    x = torch.randn(4, 32, generator=rng)
    first = layer.plan(x)
    # The host merges a LoRA in place (copy_ into the parameter): the version moves, the plan goes.
    new_w = torch.randn(16, 32, generator=rng)
    layer.set_weight(new_w, inplace_update=True)
    second = layer.plan(x)
    assert second is not first
    want = kernels.linear(x, *octet.layout.Int8Layout.quantize(new_w), lin.bias, act="static",
                          static_scale=torch.tensor([0.05]), backend="torch")
    assert torch.equal(layer(x), want)
    layer.set_static_scales(torch.tensor([0.2]))
    assert layer.plan(x) is not second
    third = layer.plan(x)
    layer.to(torch.device("cpu"))   # _apply: prepared tensors belong to the old ones
    assert layer.plan(x) is not third


def test_forward_finds_its_plan_by_exact_shape_and_forgets_shapes_beyond_a_bound(rng):
    """The forward's lookup is keyed on x's exact shape (cheaper than the M bucket's arithmetic), pointing at the
    bucket's plan: many shapes, one plan per bucket; the shape table is bounded and dropped with the plans."""
    from comfyui_octet.octet import modules
    layer, lin = _layer(rng)
    want_bucket_plans = set()
    for rows in range(1, 2 * modules._SHAPES_KEPT + 3):
        x = torch.randn(rows, 32, generator=rng)
        y = layer(x)
        want_bucket_plans.add(kernels.registry.m_bucket(rows))
        assert torch.equal(y, layer.plan(x).run(x, None))
        assert layer._by_shape[x.shape][:3] == (x.dtype, -1, False) and layer._by_shape[x.shape][-1] is layer.plan(x)
        assert len(layer._by_shape) <= modules._SHAPES_KEPT
    assert len(layer._plans) == len(want_bucket_plans)
    layer.set_weight(lin.weight * 2)
    assert layer._by_shape == {} and layer._plans == {}


def test_host_replacing_the_parameter_retires_the_plan(rng):
    layer, _ = _layer(rng)
    x = torch.randn(4, 32, generator=rng)
    first = layer.plan(x)
    layer.weight = torch.nn.Parameter(layer.weight.detach().clone(), requires_grad=False)
    assert layer.plan(x) is not first


def test_speed_goal_keeps_one_float_copy_per_layer_memory_goal_none(rng):
    layer, lin = _layer(rng)
    x = torch.randn(6, 32, generator=rng)
    req = kernels.Request("linear", "dynamic", "cuda", "float32", 6, 16, 32)
    for goal, copies in (("speed", 1), ("memory", 0)):
        ops = layer.operands(x.device)
        run = float_fallback.prepare(kernels.Request(**{**req.__dict__, "goal": goal}), ops)
        y1, y2 = run(x, None), run(x, None)
        assert torch.equal(y1, y2)
        torch.testing.assert_close(y1, torch.nn.functional.linear(x, layer.dequantized_weight(), lin.bias))
        assert sum(torch.is_tensor(v) for v in ops.memo.values()) == copies


def test_plan_summary_reports_backends_and_extra_bytes(rng):
    layer, _ = _layer(rng, act="none")
    model = torch.nn.Sequential(layer)
    model(torch.randn(3, 32, generator=rng))
    summary = plan_summary(model)
    assert summary["layers"]["0"]["backends"] == ["cpu"]
    assert summary["extra_bytes"] == 16 * 32 * 4     # the weight-only speed goal kept one fp32 copy
    layer.goal = "memory"
    model(torch.randn(3, 32, generator=rng))
    assert plan_summary(model)["extra_bytes"] == 0


def test_plans_of_one_device_share_one_kept_copy(rng):
    """The speed goal's float copy (here the CPU weight-only copy) is made once per layer, not per M bucket."""
    layer, _ = _layer(rng, act="none")
    model = torch.nn.Sequential(layer)
    for m in (3, 9, 40):   # three M buckets, three plans
        model(torch.randn(m, 32, generator=rng))
    assert len(layer._plans) == 3
    assert plan_summary(model)["extra_bytes"] == 16 * 32 * 4


def test_graph_replays_plan_apart_from_eager_calls(rng, monkeypatch):
    """Plans made while a CUDA graph is captured (its warm-up included) see Request.eager False and are
    kept apart from the layer's eager plans: host cost exists only for eager calls."""
    from comfyui_octet.kernels import dispatch
    from comfyui_octet.octet import cuda_graph
    layer, _ = _layer(rng)
    x = torch.randn(5, 32, generator=rng)
    seen = []
    real = dispatch.registry.select
    monkeypatch.setattr(dispatch.registry, "select", lambda req, *a: seen.append(req.eager) or real(req, *a))
    eager = layer.plan(x)

    class Backend(cuda_graph.GraphBackend):
        def warmup(self, fn, device, runs):
            fn()

        def capture(self, fn, device):
            return None, fn()

        def memory(self, device):
            return 0

    with torch.no_grad():
        cuda_graph.capture(lambda leaves: layer(leaves[0]), [x], cuda_graph.flatten([x])[1], x.device, Backend())
    assert seen == [True, False] and len(layer._plans) == 2
    assert layer.plan(x) is eager and not dispatch.planning_for_graph()
