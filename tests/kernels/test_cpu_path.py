"""The fast CPU path (backends/cpu.py) against the exact reference (torch_ref): the oracle stays
separate, and the path AUTO picks on a CPU computes the same numbers."""
import pytest
import torch

from comfyui_octet import kernels
from comfyui_octet.kernels import torch_ref
from comfyui_octet.kernels.backends import cpu
from kernel_testing import positive, randn


def _req(op="linear", act="dynamic", goal="speed"):
    return kernels.Request(op, act, "cpu", "float32", 0, 0, 0, goal=goal)


@pytest.fixture(params=["int_mm", "fp32_codes"])
def cpu_gemm(request, monkeypatch):
    """Both GEMMs the CPU path chooses between (per machine, by timing), each checked on every machine."""
    monkeypatch.setattr(cpu, "int_mm_pays", lambda: request.param == "int_mm")
    return request.param


@pytest.mark.parametrize("act", ["dynamic", "static"])
@pytest.mark.parametrize("smoothed", [False, True])
@pytest.mark.parametrize("shape", [(1, 41), (9, 41), (2, 7, 64), (3, 1280)])
def test_linear_is_bit_identical_to_the_reference(rng, act, smoothed, shape, cpu_gemm):
    k = shape[-1]
    x = randn(shape, rng)
    qweight, w_scale = torch_ref.quantize_weight(randn((33, k), rng))
    bias = randn(33, rng)
    smooth = positive(k, rng) if smoothed else None
    static = positive(1, rng, low=0.01, high=0.05) if act == "static" else None
    ops = kernels.Int8Operands.of(qweight, w_scale, bias, smooth)
    got = cpu.prepare(_req(act=act), ops)(x, static)
    want = torch_ref.linear_w8a8(x, qweight, w_scale, bias, smooth, static)
    assert torch.equal(got, want)
    assert kernels.linear(x, qweight, w_scale, bias, act=act, smooth=smooth, static_scale=static).equal(want)


def test_the_cpu_gemm_choice_is_timed_once_and_can_be_forced(monkeypatch):
    cpu.int_mm_pays.cache_clear()
    try:
        for forced, want in (("1", True), ("0", False)):
            monkeypatch.setenv("OCTET_CPU_INT_MM", forced)
            cpu.int_mm_pays.cache_clear()
            assert cpu.int_mm_pays() is want
        monkeypatch.delenv("OCTET_CPU_INT_MM")
        cpu.int_mm_pays.cache_clear()
        assert cpu.int_mm_pays() in (True, False) and cpu.int_mm_pays.cache_info().misses == 1
    finally:
        cpu.int_mm_pays.cache_clear()


@pytest.mark.parametrize("act", ["dynamic", "static"])
@pytest.mark.parametrize("geometry", [(1, 1, 1, 1), (2, 0, 1, 1), (1, 2, 2, 1), (1, 1, 1, 4)])
def test_conv_matches_the_reference_to_fp32_rounding(rng, act, geometry):
    stride, padding, dilation, groups = geometry
    x = randn((2, 16, 9, 11), rng)
    qweight, w_scale = torch_ref.quantize_weight(randn((12, 16 // groups, 3, 3), rng))
    bias = randn(12, rng)
    static = positive(1, rng, low=0.02, high=0.05) if act == "static" else None
    ops = kernels.Int8Operands.of(qweight, w_scale, bias, None, kernels.ConvGeometry.of(*geometry))
    got = cpu.prepare(_req("conv2d", act), ops)(x, static)
    want = torch_ref.conv2d_w8a8(x, qweight, w_scale, bias, stride, padding, dilation, groups, None, static)
    # Same int8 codes on both sides, sums of 144 products exact in fp32 (< 2^24), the same float64
    # epilogue: bit-identical.
    assert torch.equal(got, want)


def test_weight_only_keeps_a_float_copy_only_for_the_speed_goal(rng):
    x = randn((4, 32), rng)
    qweight, w_scale = torch_ref.quantize_weight(randn((8, 32), rng))
    want = torch_ref.linear_w8a16(x, qweight, w_scale, None)
    for goal, kept in (("speed", 1), ("memory", 0)):
        ops = kernels.Int8Operands.of(qweight, w_scale)
        run = cpu.prepare(_req(act="none", goal=goal), ops)
        assert torch.equal(run(x, None), want) and torch.equal(run(x, None), want)
        assert len(ops.memo) == kept


def test_auto_on_cpu_runs_the_cpu_path_and_torch_runs_the_oracle(rng):
    x = randn((3, 16), rng)
    qweight, w_scale = torch_ref.quantize_weight(randn((8, 16), rng))
    ops = kernels.Int8Operands.of(qweight, w_scale)
    assert kernels.plan("linear", "dynamic", x, ops)[0].name == "cpu"
    assert kernels.plan("linear", "dynamic", x, ops, backend="torch")[0].name == "torch"
