"""The dispatcher's choices, the float and bitsandbytes backends, and the torch.library ops."""
import dataclasses
import logging

import pytest
import torch
import torch.nn.functional as F

from comfyui_octet import kernels
from comfyui_octet.kernels import ops, registry, torch_ref
from comfyui_octet.kernels.backends import float_fallback, triton_backend, triton_support
from kernel_testing import positive, randn, requires_triton, sqnr_db


def _req(op="linear", act="dynamic", device="cuda", m=4608, n=9216, k=3072, groups=1, dtype="bfloat16"):
    return registry.Request(op, act, device, dtype, m, n, k, groups)


@pytest.fixture
def fake_gpu(monkeypatch):
    """Pretend Triton can run on an sm90 GPU, so AUTO's rules can be checked without one."""
    monkeypatch.setattr(triton_support, "unavailable_reason", lambda: None)
    monkeypatch.setattr(triton_backend.triton_support, "capability", lambda index=0: (9, 0))
    yield


def _with_capability(monkeypatch, cap):
    monkeypatch.setattr(triton_backend.triton_support, "capability", lambda index=0: cap)


def test_auto_on_cpu_picks_the_cpu_path_even_under_the_interpreter(monkeypatch):
    # select is not cached: a changed environment takes effect at once, no cache to clear.
    for interp in ("0", "1"):
        monkeypatch.setenv("TRITON_INTERPRET", interp)
        assert registry.select(_req(device="cpu")).name == "cpu"
        assert registry.select(_req(op="conv2d", device="cpu")).name == "cpu"
    assert registry.select(_req(device="cpu"), "torch").name == "torch"   # the oracle, when asked


def test_explicit_triton_on_plain_cpu_falls_back_loudly(monkeypatch, caplog):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with caplog.at_level(logging.INFO, logger="octet.kernels"):
        chosen = registry.select(_req(device="cpu", m=3, n=5, k=7), "triton")
    assert chosen.name != "triton"
    assert any("triton" in r.getMessage() for r in caplog.records)


def test_auto_on_hopper_picks_triton_for_large_gemms(fake_gpu):
    assert registry.select(_req()).name == "triton"
    assert registry.select(_req(op="conv2d", m=16384, n=640, k=5760)).name == "triton"


def test_auto_falls_back_to_float_where_int8_loses(fake_gpu, caplog, monkeypatch):
    monkeypatch.setattr(registry, "_logged", set())     # said once per process: not by a test that ran before
    with caplog.at_level(logging.INFO, logger="octet.kernels"):
        assert registry.select(_req(m=77, n=640, k=640)).name == "float"
    assert any("estimated slower than the float path" in r.getMessage() for r in caplog.records)
    # Tiny M with a large weight: where the float path dequantizes per call (memory goal) that costs more
    # than the whole INT8 GEMM; with the speed goal it would keep a bf16 copy of the layer to save host
    # time a GPU-bound step hides, so INT8 (half the bytes read) in eager steps and graphs alike.
    assert registry.select(dataclasses.replace(_req(m=1, n=18432, k=3072), goal="memory")).name == "triton"
    assert registry.select(_req(m=1, n=18432, k=3072)).name == "triton"
    assert registry.select(dataclasses.replace(_req(m=1, n=18432, k=3072), eager=False)).name == "triton"
    # ... but an explicit request for triton is honoured: the table is about speed, not ability.
    assert registry.select(_req(m=77, n=640, k=640), "triton").name == "triton"


def test_auto_rejects_old_gpus_and_grouped_convs(fake_gpu, monkeypatch):
    _with_capability(monkeypatch, (7, 0))
    assert registry.select(_req()).name == "float"
    _with_capability(monkeypatch, (7, 5))
    assert "sm80" in triton_backend.rejects(_req())
    _with_capability(monkeypatch, (9, 0))
    assert registry.select(_req(op="conv2d", m=16384, n=640, k=640, groups=2)).name == "float"
    assert registry.select(_req(dtype="float64")).name == "float"


def test_weight_only_uses_triton_only_while_memory_bound(fake_gpu):
    assert registry.select(_req(act="none", m=1, n=18432, k=3072)).name == "triton"
    # Large M: one-pass dequantize + cuBLAS (inside the Triton backend) reached 0.93-0.96x bf16.
    assert registry.select(_req(act="none", m=4608)).name == "triton"
    # Between, weight-only loses to bf16 either way: the float path (and the goal) decide.
    assert registry.select(_req(act="none", m=256, n=12288)).name == "float"


def test_unknown_backend_lists_the_registered_ones():
    with pytest.raises(KeyError, match="Registered backends"):
        registry.get("nope")
    assert {"torch", "triton", "float", "bitsandbytes"} <= set(registry.registered())


@pytest.mark.parametrize("smoothed", [False, True])
def test_float_path_undoes_smoothing_and_matches_float(rng, smoothed):
    x = randn((6, 32), rng)
    w = randn((12, 32), rng)
    smooth = positive(32, rng) if smoothed else None
    w_folded = w * smooth if smoothed else w          # what SmoothQuant stores
    qweight, w_scale = torch_ref.quantize_weight(w_folded)
    y = float_fallback.prepare(_req(device="cuda"), kernels.Int8Operands.of(qweight, w_scale, None, smooth))(x, None)
    assert sqnr_db(y, F.linear(x, w)) > 35
    xc = randn((1, 32, 5, 5), rng)
    wc = randn((8, 32, 3, 3), rng)
    wc_folded = wc * smooth.reshape(1, -1, 1, 1) if smoothed else wc
    qc, sc = torch_ref.quantize_weight(wc_folded)
    conv = kernels.Int8Operands.of(qc, sc, None, smooth, kernels.ConvGeometry.of(1, 1, 1, 1))
    yc = float_fallback.prepare(_req(op="conv2d", device="cuda"), conv)(xc, None)
    assert sqnr_db(yc, F.conv2d(xc, wc, None, 1, 1)) > 35


def test_bitsandbytes_backend(rng):
    pytest.importorskip("bitsandbytes")
    from comfyui_octet.kernels.backends import bnb
    x = randn((8, 64), rng)
    x[:, 3] *= 40.0                          # one outlier feature column, as in LLM.int8()
    w = randn((16, 64), rng)
    qweight, w_scale = torch_ref.quantize_weight(w)
    plain = bnb.linear(x, qweight, w_scale, None, "dynamic", None, None, threshold=0.0)
    # Without outliers held back it is W8A8 with per-token scales: the reference's numbers.
    assert sqnr_db(plain, torch_ref.linear_w8a8(x, qweight, w_scale, None)) > 35
    mixed = kernels.linear(x, qweight, w_scale, None, backend="bitsandbytes")
    exact_w = torch_ref.dequantize_weight(qweight, w_scale)
    # Holding the outlier column back in float must be closer to float math than plain W8A8.
    assert sqnr_db(mixed, F.linear(x, exact_w)) > sqnr_db(plain, F.linear(x, exact_w)) + 3
    assert bnb.IMPLEMENTATION.rejects(_req(act="static")) is not None


def test_bitsandbytes_unavailable_reason_is_honest():
    from comfyui_octet.kernels.backends import bnb
    try:
        import bitsandbytes  # noqa: F401
        assert bnb.IMPLEMENTATION.unavailable_reason() is None
    except Exception:
        assert "bitsandbytes not importable" in bnb.IMPLEMENTATION.unavailable_reason()


@requires_triton
def test_opcheck_custom_ops(rng, device):
    x = randn((5, 48), rng, torch.bfloat16, device)
    qweight, w_scale = (t.to(device) for t in torch_ref.quantize_weight(randn((24, 48), rng)))
    bias = randn(24, rng, torch.bfloat16, device)
    static = positive(1, rng, device, 0.02, 0.05)
    for backend in ("triton", "torch"):
        torch.library.opcheck(ops.linear, (x, qweight, w_scale, bias, None, None, "dynamic", backend, "speed"))
        torch.library.opcheck(ops.linear, (x.reshape(1, 5, 48), qweight, w_scale, None, positive(48, rng, device),
                                           static, "static", backend, "speed"))
        torch.library.opcheck(ops.linear, (x, qweight, w_scale, None, None, None, "none", backend, "memory"))
    xc = randn((1, 8, 5, 6), rng, torch.float16, device)
    qc, sc = (t.to(device) for t in torch_ref.quantize_weight(randn((4, 8, 3, 3), rng)))
    torch.library.opcheck(ops.conv2d, (xc, qc, sc, None, None, None, [1, 1], [1, 1], [1, 1], 1, "dynamic", "triton",
                                       "speed"))


@requires_triton
def test_torch_compile_sees_one_op_without_graph_breaks(rng, device):
    x = randn((4, 32), rng, torch.float32, device)
    qweight, w_scale = (t.to(device) for t in torch_ref.quantize_weight(randn((16, 32), rng)))

    def layer(inp):
        return kernels.linear(inp, qweight, w_scale, None, backend="triton") * 2.0

    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)   # fullgraph: a break raises
    torch.testing.assert_close(compiled(x), layer(x))


def test_the_speed_goal_keeps_a_float_copy_only_with_the_reserve_left_free(monkeypatch):
    """The copy is made at a layer's first call; on a card already near full it must not be what runs it out of
    memory (SDXL with 4.5 GiB free ran bf16 and not Octet's default, H200 2026-12-04)."""
    from types import SimpleNamespace

    from comfyui_octet.kernels import dispatch, vram
    from comfyui_octet.kernels.operands import Int8Operands
    w = Int8Operands.of(torch.zeros(1024, 512, dtype=torch.int8), torch.ones(1024))     # bf16 copy: 1 MiB
    x = SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.bfloat16)
    reserve = 3 << 30
    monkeypatch.setattr(vram, "reserve", lambda device: reserve)
    monkeypatch.setattr(vram, "free", lambda device: reserve + (1 << 20))
    assert dispatch.float_copy_fits(x, w)                       # exactly the copy above the reserve
    monkeypatch.setattr(vram, "free", lambda device: reserve + (1 << 20) - 1)
    assert not dispatch.float_copy_fits(x, w)
    w.memo[("float", torch.bfloat16)] = object()                # made earlier: it stays
    assert dispatch.float_copy_fits(x, w)
    assert dispatch.float_copy_fits(SimpleNamespace(device=torch.device("cpu"), dtype=torch.bfloat16), w)


def test_a_layer_short_of_vram_is_planned_as_with_the_memory_goal_and_said_once(monkeypatch, caplog):
    from comfyui_octet.kernels import dispatch
    from comfyui_octet.kernels.operands import Int8Operands
    w = Int8Operands.of(torch.zeros(64, 32, dtype=torch.int8), torch.ones(64))
    x = torch.zeros(4, 32)
    goals = []
    real_select = registry.select
    monkeypatch.setattr(registry, "select", lambda req, backend="auto": goals.append(req.goal) or real_select(req, backend))
    monkeypatch.setattr(dispatch, "_short_of_vram", [0])
    monkeypatch.setattr(dispatch, "float_copy_fits", lambda x, w: False)
    monkeypatch.setattr(dispatch.vram, "free", lambda device: 0)
    with caplog.at_level(logging.WARNING, logger="octet"):
        for _ in range(2):
            dispatch.plan("linear", "dynamic", x, w, goal="speed")
        dispatch.plan("linear", "dynamic", x, w, goal="memory")
        dispatch.plan_mlp(x, w, Int8Operands.of(torch.zeros(32, 64, dtype=torch.int8), torch.ones(32)))  # static chain
    monkeypatch.setattr(dispatch, "float_copy_fits", lambda x, w: True)
    dispatch.plan("linear", "dynamic", x, w, goal="speed")
    assert goals == ["memory"] * 5 + ["speed"]
    assert len([r for r in caplog.records if "planned as with goal memory" in r.getMessage()]) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_a_layer_short_of_vram_keeps_no_float_copy_and_computes_as_with_the_memory_goal(monkeypatch):
    """Where the reserve would not stay free, the speed goal's layer keeps nothing beside its int8 weight and gives
    the memory goal's numbers (a reserve larger than any card stands for a full one)."""
    from comfyui_octet import octet
    from comfyui_octet.kernels import vram
    from comfyui_octet.octet.modules import plan_summary
    torch.manual_seed(0)
    x = torch.randn(2, 77, 640, device="cuda", dtype=torch.bfloat16)        # SDXL cross-attention's k: float path
    outputs, extra = {}, {}
    for goal, reserve in (("memory", vram.DEFAULT_RESERVE_BYTES), ("speed", 1 << 60)):
        monkeypatch.setattr(vram, "reserve", lambda device, reserve=reserve: reserve)
        torch.manual_seed(1)        # before the Linear: its bias comes from the same generator
        model = torch.nn.Sequential(torch.nn.Linear(640, 1280)).to("cuda", torch.bfloat16)
        torch.nn.init.normal_(model[0].weight, std=0.05)
        octet.quantize_(model, octet.WeightOnlyConfig(goal=goal))
        with torch.no_grad():
            outputs[goal] = model(x)
        extra[goal] = plan_summary(model)["extra_bytes"]
    assert extra["speed"] == extra["memory"]         # no bf16 copy beside what the memory goal keeps
    torch.testing.assert_close(outputs["speed"], outputs["memory"], rtol=0, atol=0)


def test_a_bad_vram_reserve_setting_is_said_and_ignored(caplog):
    from comfyui_octet.kernels import vram
    assert vram.floor_from_env(None) == 0 and vram.floor_from_env(" ") == 0
    assert vram.floor_from_env("2048") == 2048 * 2**20 and vram.floor_from_env("0.5") == 2**19
    with caplog.at_level(logging.WARNING, logger="octet"):
        for bad in ("2 GiB", "-1", "nan", "inf"):
            assert vram.floor_from_env(bad) == 0
    said = [r.getMessage() for r in caplog.records if "OCTET_VRAM_RESERVE_MIB" in r.getMessage()]
    assert len(said) == 4 and "'2 GiB' is not a number of MiB" in said[0], said


def test_operands_free_the_copies_made_for_them_and_never_the_layers_own_tensors():
    """A streamed layer's per-call operands (octet/modules.py) give back their copies when the call returns; the
    layer's tensors, and views of them (``of`` reshapes an fp32 scale without copying), are left as they were."""
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-127, 128, (8, 16), dtype=torch.int8, generator=g)
    scale = torch.rand(8, 1, generator=g) + 0.5                     # fp32 [N, 1]: ``of`` takes a view
    bias = torch.randn(8, generator=g)
    scale_before, bias_before = scale.clone(), bias.clone()
    ops = kernels.Int8Operands.of(q.clone(), scale, bias)           # a copy of the weight, as a streamed call's
    derived = ops.remember("derived", lambda: ops.qweight.float() * 2)
    assert ops.scale.untyped_storage().data_ptr() == scale.untyped_storage().data_ptr() and ops.bias is bias
    ops.free_copies(q, scale, bias)
    assert ops.qweight.untyped_storage().nbytes() == 0 and derived.untyped_storage().nbytes() == 0
    assert q.untyped_storage().nbytes() == q.numel()
    torch.testing.assert_close(scale, scale_before, rtol=0, atol=0)
    torch.testing.assert_close(bias, bias_before, rtol=0, atol=0)
    torch.testing.assert_close(ops.scale, scale_before.reshape(-1), rtol=0, atol=0)


def test_a_plan_for_one_call_is_not_counted_as_a_plan_made():
    """A streamed layer plans at every call (octet/modules.py): those plans are kept nowhere, so they must not make
    the deferred LayerNorms / GELUs' remembered "no" stale (kernels.dispatch.plans_made) at every call; a kept plan
    does. Both compute the same."""
    from comfyui_octet.kernels import dispatch
    g = torch.Generator().manual_seed(0)
    ops = kernels.Int8Operands.of(torch.randint(-127, 128, (8, 16), dtype=torch.int8, generator=g),
                                  torch.rand(8, 1, generator=g) + 0.5)
    x = torch.randn(3, 16, generator=g)
    before = dispatch.plans_made()
    _, once = kernels.plan("linear", "dynamic", x, ops, "cpu", "memory", one_call=True)
    assert dispatch.plans_made() == before
    _, kept = kernels.plan("linear", "dynamic", x, ops, "cpu", "memory")
    assert dispatch.plans_made() == before + 1
    torch.testing.assert_close(once(x, None), kept(x, None), rtol=0, atol=0)
