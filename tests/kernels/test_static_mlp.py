"""The static MLP chain fc1 -> GELU(tanh) -> fc2: fc1's epilogue writes fc2's int8 input.

Reference: torch_ref.gelu_tanh_quantize / torch_ref.static_mlp, and a float64 computation with the
dequantized weights for the size of the INT8 error. The GELU in the kernel and in torch differ in
the last bits of fp32, so a hidden code may land one step away where GELU(h)/scale sits on a
rounding boundary: that is allowed for a small fraction of codes, nothing more.
"""
import pytest
import torch
import torch.nn.functional as F

from comfyui_octet import kernels
from comfyui_octet.kernels import ops, torch_ref
from kernel_testing import positive, randn, requires_triton, sqnr_db

pytestmark = requires_triton

# (M, K, hidden N): K % 16 == 0 (TMA path) and not (pointer path), N not a tile multiple.
SHAPES = [(37, 48, 72), (5, 40, 33), (64, 96, 128)]


def _fc(n, k, rng, device, bias=True):
    q, s = torch_ref.quantize_weight(randn((n, k), rng) * positive((n, 1), rng, low=0.2, high=2.0) / k ** 0.5)
    b = randn(n, rng, device=device) * 0.3 if bias else None
    return q.to(device), s.to(device), b


def _static_scale(t, smooth=None):
    v = t.float() if smooth is None else t.float() / smooth.float()
    return (v.abs().amax() / 127 * 0.9).reshape(1)  # a little saturation, as a calibrated scale has


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("smoothed", [False, True])
def test_gelu_quant_epilogue_matches_reference(shape, with_bias, smoothed, rng, device):
    from comfyui_octet.kernels.backends import triton_gemm
    m, k, n = shape
    a = torch.randint(-127, 128, (m, k), generator=rng, dtype=torch.int8).to(device)
    a_scale = positive(1, rng, device, 0.01, 0.03)
    qw, ws, bias = _fc(n, k, rng, device, with_bias)
    h = torch_ref.gemm_epilogue(torch_ref.int_matmul(a.cpu(), qw.cpu()), a_scale.cpu().expand(m, 1), ws.cpu(),
                                None if bias is None else bias.cpu(), torch.float32)
    smooth = positive(n, rng, device, 0.5, 2.0) if smoothed else None
    q_scale = _static_scale(F.gelu(h, approximate="tanh"), None if smooth is None else smooth.cpu()).to(device)
    expected = torch_ref.gelu_tanh_quantize(h, None if smooth is None else smooth.cpu(), q_scale.cpu())

    codes = triton_gemm.w8a8_gemm(a, a_scale, qw, ws, bias, torch.bfloat16, gelu_quant=(smooth, q_scale))
    assert codes.dtype == torch.int8 and codes.shape == (m, n)
    diff = (codes.cpu().int() - expected.int()).abs()
    assert diff.max() <= 1
    assert diff.float().mean() < 0.01
    # The data exercise the whole grid, not a corner of it.
    assert expected.float().std() > 5 and (expected.abs() == 127).float().mean() < 0.1


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("smoothed", [False, True])
def test_static_mlp_chain_matches_reference_and_float(shape, dtype, smoothed, rng, device):
    m, k, n = shape
    x = randn((2, m, k), rng, dtype, device)
    q1, s1, b1 = _fc(n, k, rng, device)
    q2, s2, b2 = _fc(k, n, rng, device)
    sm1 = positive(k, rng, device) if smoothed else None
    sm2 = positive(n, rng, device) if smoothed else None
    # Float model: the smoothing divisor is folded into the int8 weights, so the float weight of
    # fc is dequant(q) / smooth (per input channel).
    w1 = torch_ref.dequantize_weight(q1.cpu(), s1.cpu(), torch.float64) / (1 if sm1 is None else sm1.cpu().double())
    w2 = torch_ref.dequantize_weight(q2.cpu(), s2.cpu(), torch.float64) / (1 if sm2 is None else sm2.cpu().double())
    h64 = F.gelu(x.cpu().double() @ w1.T + b1.cpu().double(), approximate="tanh")
    y64 = h64 @ w2.T + b2.cpu().double()
    sc1 = _static_scale(x.cpu(), None if sm1 is None else sm1.cpu()).to(device)
    sc2 = _static_scale(h64, None if sm2 is None else sm2.cpu()).float().to(device)
    fc1, fc2 = (q1, s1, b1, sm1, sc1), (q2, s2, b2, sm2, sc2)

    y = kernels.static_mlp(x, fc1, fc2, backend="triton")
    ref = torch_ref.static_mlp(x.cpu(), *[tuple(None if t is None else t.cpu() for t in fc) for fc in (fc1, fc2)])
    assert y.dtype == dtype and y.shape == (2, m, k)
    assert sqnr_db(y.cpu(), ref) > 35          # same codes but for rare one-step hidden differences
    assert sqnr_db(y.cpu(), y64) > 22          # the INT8 error of two static layers
    assert abs(sqnr_db(y.cpu(), y64) - sqnr_db(ref, y64)) < 1.0


def test_torch_backend_chain_equals_the_two_layers_in_fp32(rng):
    """On CPU (fp32) the fused reference and the per-layer path compute the same numbers: the
    chain changes where the hidden tensor lives, not the quantization."""
    x = randn((3, 7, 40), rng)
    q1, s1, b1 = _fc(56, 40, rng, "cpu")
    q2, s2, b2 = _fc(40, 56, rng, "cpu")
    sm2 = positive(56, rng)
    sc1 = _static_scale(x)
    h = F.gelu(kernels.linear(x, q1, s1, b1, act="static", static_scale=sc1, backend="torch"), approximate="tanh")
    sc2 = _static_scale(h, sm2)
    layered = kernels.linear(h, q2, s2, b2, act="static", smooth=sm2, static_scale=sc2, backend="torch")
    fused = kernels.static_mlp(x, (q1, s1, b1, None, sc1), (q2, s2, b2, sm2, sc2), backend="torch")
    assert torch.equal(fused, layered)


def test_static_mlp_needs_static_scales(rng, device):
    q, s, b = _fc(8, 16, rng, device)
    x = randn((2, 16), rng, device=device)
    with pytest.raises(ValueError, match="static scale"):
        kernels.static_mlp(x, (q, s, b, None, None), (q.T.contiguous(), s, None, None, None))


def test_opcheck_and_compile(rng, device):
    x = randn((5, 48), rng, torch.bfloat16, device)
    q1, s1, b1 = _fc(24, 48, rng, device)
    q2, s2, b2 = _fc(48, 24, rng, device)
    sc1, sc2 = positive(1, rng, device, 0.01, 0.03), positive(1, rng, device, 0.005, 0.01)
    sm2 = positive(24, rng, device)
    torch.library.opcheck(ops.static_mlp, (x, q1, s1, b1, None, sc1, q2, s2, b2, sm2, sc2, "triton"))
    fc1, fc2 = (q1, s1, b1, None, sc1), (q2, s2, b2, sm2, sc2)

    def block(inp):
        return kernels.static_mlp(inp, fc1, fc2, backend="triton") + 1.0

    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)   # fullgraph: a break raises
    torch.testing.assert_close(compiled(x), block(x))
