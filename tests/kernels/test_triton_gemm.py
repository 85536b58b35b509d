"""Triton GEMMs against torch_ref: integer accumulation exact, epilogue within dtype rounding."""
import pytest
import torch
import torch.nn.functional as F

from comfyui_octet import kernels
from comfyui_octet.kernels import torch_ref
from kernel_testing import assert_epilogue_close, positive, randn, requires_triton, sqnr_db

pytestmark = requires_triton

# (M, N, K): none tile multiples, K below one tile, K % 16 == 0 (TMA path) and not (pointer path).
SHAPES = [(9, 41, 341), (1, 17, 8), (33, 64, 96), (70, 130, 48)]
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def _weights(n, k, rng, device):
    qweight, w_scale = torch_ref.quantize_weight(randn((n, k), rng) * positive((n, 1), rng, low=0.2, high=3.0))
    return qweight.to(device), w_scale.to(device)


@pytest.mark.parametrize("shape", SHAPES)
def test_int8_accumulation_is_exact(shape, rng, device):
    from comfyui_octet.kernels.backends import triton_gemm
    m, n, k = shape
    a = torch.randint(-127, 128, (m, k), generator=rng, dtype=torch.int8).to(device)
    b = torch.randint(-127, 128, (n, k), generator=rng, dtype=torch.int8).to(device)
    ones_m, ones_n = torch.ones(m, device=device), torch.ones(n, device=device)
    # Unit scales and fp32 output: every |acc| < 2^24 here, so the float result is the integer.
    y = triton_gemm.w8a8_gemm(a, ones_m, b, ones_n, None, torch.float32)
    assert torch.equal(y, torch_ref.int_matmul(a.cpu(), b.cpu()).float().to(device))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ["dynamic", "static"])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("smoothed", [False, True])
def test_w8a8_linear_matches_reference(shape, dtype, act, with_bias, smoothed, rng, device):
    m, n, k = shape
    x = randn((m, k), rng, dtype, device, scale=2.0)
    qweight, w_scale = _weights(n, k, rng, device)
    bias = randn(n, rng, dtype, device) if with_bias else None
    smooth = positive(k, rng, device) if smoothed else None
    static_scale = positive(1, rng, device, 0.02, 0.06) if act == "static" else None
    y = kernels.linear(x, qweight, w_scale, bias, act=act, smooth=smooth, static_scale=static_scale,
                       backend="triton")
    expected = torch_ref.linear_w8a8(x, qweight, w_scale, bias, smooth, static_scale)
    assert_epilogue_close(y, expected)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_w8a16_linear_matches_reference(shape, dtype, with_bias, rng, device):
    m, n, k = shape
    x = randn((m, k), rng, dtype, device)
    qweight, w_scale = _weights(n, k, rng, device)
    bias = randn(n, rng, dtype, device) if with_bias else None
    y = kernels.linear(x, qweight, w_scale, bias, act="none", backend="triton")
    expected = torch_ref.linear_w8a16(x.float(), qweight, w_scale, None if bias is None else bias.float())
    # Scale applied after the sum instead of to each weight: differences are output rounding only
    # (bf16 weights in the reference are rounded too, hence the looser bf16 bound).
    assert y.dtype == dtype
    assert sqnr_db(y, expected) > {torch.float32: 100, torch.float16: 55, torch.bfloat16: 40}[dtype]


def test_linear_keeps_leading_dims_and_is_close_to_float(rng, device):
    x = randn((2, 7, 96), rng, torch.bfloat16, device)
    w = randn((80, 96), rng)
    qweight, w_scale = torch_ref.quantize_weight(w)
    y = kernels.linear(x, qweight.to(device), w_scale.to(device), act="dynamic", backend="triton")
    assert y.shape == (2, 7, 80)
    # INT8 W8A8 of Gaussian data: ~35 dB SQNR against the float layer; 25 dB fails on any bug.
    assert sqnr_db(y.float().cpu(), F.linear(x.float().cpu(), w)) > 25


def test_static_scale_required(rng, device):
    qweight, w_scale = _weights(8, 16, rng, device)
    with pytest.raises(ValueError, match="static_scale"):
        kernels.linear(randn((2, 16), rng, device=device), qweight, w_scale, act="static", backend="triton")


def test_shape_mismatch_is_rejected(rng, device):
    from comfyui_octet.kernels.backends import triton_gemm
    a = torch.randint(-127, 128, (4, 32), generator=rng, dtype=torch.int8).to(device)
    b = torch.randint(-127, 128, (8, 16), generator=rng, dtype=torch.int8).to(device)
    with pytest.raises(ValueError, match="qweight"):
        triton_gemm.w8a8_gemm(a, torch.ones(4, device=device), b, torch.ones(8, device=device), None, torch.float32)


@pytest.mark.parametrize("shape", [(70, 130, 48), (33, 64, 96)])
@pytest.mark.parametrize("epilogue", ["plain", "gelu", "gelu_quant"])
def test_persistent_tma_variant_is_exact(shape, epilogue, rng, device):
    """The persistent (one program per SM, flattened tile loop) variant, launched directly: the
    autotuner only reaches it on Hopper, so CI checks it here, with both epilogues."""
    import triton
    import torch.nn.functional as F
    from triton.tools.tensor_descriptor import TensorDescriptor
    from comfyui_octet.kernels.backends import triton_gemm
    m, n, k = shape
    a = torch.randint(-127, 128, (m, k), generator=rng, dtype=torch.int8).to(device)
    b = torch.randint(-127, 128, (n, k), generator=rng, dtype=torch.int8).to(device)
    a_scale, w_scale = positive(m, rng, device, 0.005, 0.01), positive(n, rng, device, 0.005, 0.01)
    bias = randn(n, rng, device=device)
    acc = torch_ref.int_matmul(a.cpu(), b.cpu())
    gelu_quant, gelu = epilogue == "gelu_quant", epilogue == "gelu"
    expected = torch_ref.gemm_epilogue(acc, a_scale.cpu(), w_scale.cpu(), bias.cpu(), torch.float32)
    q_smooth = positive(n, rng, device)
    q_scale = (F.gelu(expected, approximate="tanh") / q_smooth.cpu()).abs().amax().reshape(1).to(device) / 120
    out = torch.full((m, n), float("nan"), device=device) if not gelu_quant else \
        torch.zeros((m, n), dtype=torch.int8, device=device)
    bm, bn, bk, programs = 32, 32, 32, 3   # fewer programs than tiles: each walks several
    kernel = triton_gemm._w8a8_kernel.fn
    kernel[(programs,)](TensorDescriptor.from_tensor(a, [bm, bk]), TensorDescriptor.from_tensor(b, [bn, bk]),
                        out, a_scale, w_scale, bias, q_smooth, q_scale, m, n, k, triton_gemm.m_bucket(m), programs,
                        k, k, n, 1, HAS_BIAS=True, USE_TMA=True, GELU_QUANT=gelu_quant, HAS_Q_SMOOTH=gelu_quant,
                        GELU=gelu, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=2, PERSISTENT=True)
    if gelu_quant:
        codes = torch_ref.gelu_tanh_quantize(expected, q_smooth.cpu(), q_scale.cpu())
        diff = (out.cpu().int() - codes.int()).abs()
        assert diff.max() <= 1 and diff.float().mean() < 0.01 and codes.float().std() > 5
    elif gelu:
        assert_epilogue_close(out.cpu(), F.gelu(expected, approximate="tanh"))
    else:
        assert_epilogue_close(out.cpu(), expected)
    assert triton.cdiv(m, bm) * triton.cdiv(n, bn) > programs


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("act", ["dynamic", "static"])
def test_gelu_epilogue_matches_reference(shape, dtype, act, rng, device):
    """An MLP fc1's GEMM with the GELU applied to its fp32 output before the one rounding: torch_ref's
    gemm_epilogue(gelu=True) within the output's rounding, and (the check that the GELU is there at all) far
    from the plain GEMM's output wherever that is negative."""
    from comfyui_octet.kernels.backends import triton_gemm
    m, n, k = shape
    x = randn((m, k), rng, dtype, device, scale=2.0)
    qweight, w_scale = _weights(n, k, rng, device)
    bias = randn(n, rng, dtype, device)
    static_scale = positive(1, rng, device, 0.02, 0.06) if act == "static" else None
    xq, xs = torch_ref.quantize_rows(x.cpu(), None, None if static_scale is None else static_scale.cpu())
    gemm = triton_gemm.W8A8Gemm(qweight, w_scale, bias, gelu=True)
    y = gemm(xq.to(device), xs.to(device), dtype)
    expected = torch_ref.linear_w8a8(x.cpu(), qweight.cpu(), w_scale.cpu(), bias.cpu(), None,
                                     None if static_scale is None else static_scale.cpu(), gelu=True)
    assert_epilogue_close(y.cpu(), expected)
    plain = torch_ref.linear_w8a8(x.cpu(), qweight.cpu(), w_scale.cpu(), bias.cpu(), None,
                                  None if static_scale is None else static_scale.cpu())
    negative = plain.float() < -1.0
    assert negative.any() and (y.cpu().float()[negative] - plain.float()[negative]).abs().min() > 0.5


def test_gelu_epilogue_excludes_gelu_quant(rng, device):
    from comfyui_octet.kernels.backends import triton_gemm
    qweight, w_scale = _weights(8, 16, rng, device)
    with pytest.raises(ValueError, match="pick one"):
        triton_gemm.W8A8Gemm(qweight, w_scale, None, gelu_quant=True, gelu=True)



@pytest.mark.parametrize("shape", [(2, 9, 41, 341), (1, 33, 64, 96), (3, 7, 130, 48)])
@pytest.mark.parametrize("gate_kind", ["per_batch", "shared"])
@pytest.mark.parametrize("act", ["dynamic", "static"])
def test_residual_epilogue_matches_reference(shape, gate_kind, act, rng, device):
    """A block's gated residual in the GEMM's epilogue, res + gemm(x) * gate[batch]: the gate as Wan hands it
    (a [B, 1, N] chunk of its [B, 6, N] modulation, rows 6N apart) or one row for all; against torch_ref's
    epilogue and the residual in fp32, within the output's rounding."""
    from comfyui_octet.kernels.backends import triton_gemm
    b, l, n, k = shape
    dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    x = randn((b * l, k), rng, dtype, device, scale=2.0)
    qweight, w_scale = _weights(n, k, rng, device)
    bias = randn(n, rng, dtype, device)
    res = randn((b, l, n), rng, dtype, device, scale=3.0)
    if gate_kind == "per_batch":
        gate, stride = randn((b, 6, n), rng, dtype, device)[:, 5:6], 6 * n
    else:
        gate, stride = randn((1, 1, n), rng, dtype, device), 0
    static_scale = positive(1, rng, device, 0.02, 0.06) if act == "static" else None
    xq, xs = torch_ref.quantize_rows(x.cpu(), None, None if static_scale is None else static_scale.cpu())
    gemm = triton_gemm.W8A8Gemm(qweight, w_scale, bias)
    out = gemm.run_residual(xq.to(device), xs.reshape(-1).float().to(device), res.reshape(b * l, n), gate, l, stride)
    y = torch_ref.gemm_epilogue(torch_ref.int_matmul(xq, qweight.cpu()), xs.expand(b * l, 1), w_scale.cpu(),
                                bias.cpu(), torch.float32)
    expected = (res.cpu().float() + y.reshape(b, l, n) * gate.cpu().float()).to(dtype).reshape(b * l, n)
    assert out.dtype == dtype and out.shape == (b * l, n)
    assert_epilogue_close(out.cpu(), expected)
    assert (out.cpu().float() - res.cpu().float().reshape(b * l, n)).abs().max() > 0.1    # the layer is there


@pytest.mark.parametrize("gate_kind", ["per_batch", "shared"])
def test_residual_epilogue_with_host_rounding_is_the_hosts_two_ops_to_the_bit(gate_kind, rng, device):
    """Flux's ``x += layer(h) * gate`` in a compiled graph (octet/compile_pass.py): with ``host_rounding`` the
    epilogue rounds the layer's output and the product to the output dtype as torch does, so it equals the plain
    GEMM's output followed by torch's mul and add exactly (bf16 on a GPU; fp32 in the CPU interpreter); the default
    epilogue (one rounding, Wan's) differs from it in bf16."""
    from comfyui_octet.kernels.backends import triton_gemm
    b, l, n, k = 2, 9, 41, 341
    dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    x = randn((b * l, k), rng, dtype, device, scale=2.0)
    qweight, w_scale = _weights(n, k, rng, device)
    res = randn((b, l, n), rng, dtype, device, scale=3.0)
    if gate_kind == "per_batch":
        gate, stride = randn((b, 6, n), rng, dtype, device)[:, 2:3], 6 * n
    else:
        gate, stride = randn((1, 1, n), rng, dtype, device), 0
    xq, xs = torch_ref.quantize_rows(x.cpu(), None, None)
    xq, xs = xq.to(device), xs.reshape(-1).float().to(device)
    gemm = triton_gemm.W8A8Gemm(qweight, w_scale, randn(n, rng, dtype, device))
    expected = (res + gemm(xq, xs, dtype).reshape(b, l, n) * gate).reshape(b * l, n)
    out = gemm.run_residual(xq, xs, res.reshape(b * l, n), gate, l, stride, host_rounding=True)
    assert out.dtype == dtype and torch.equal(out, expected)
    if dtype == torch.bfloat16:
        once = gemm.run_residual(xq, xs, res.reshape(b * l, n), gate, l, stride)
        assert not torch.equal(once, expected)
