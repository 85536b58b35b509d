"""The fused weight-only GEMM (triton_w8a16) against an exact reference: int8 weight read as stored,
converted in registers, fp32 accumulation, per-row scale in the epilogue."""
import pytest
import torch

from comfyui_octet.kernels import torch_ref
from kernel_testing import assert_epilogue_close, positive, randn, requires_triton

pytestmark = requires_triton

# None tile multiples; K below one tile; K % 16 == 0 (TMA path) and not (pointer path).
SHAPES = [(9, 41, 341), (1, 17, 8), (33, 64, 96), (70, 130, 48)]
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# Both operand orders, each through TMA descriptors and pointer loads: the autotuner picks among
# them on a GPU, so each one is launched directly here.
VARIANTS = [(swap, tma) for swap in (True, False) for tma in (True, False)]


def _reference(x, qweight, w_scale, bias):
    """(x @ q^T) * w_scale + bias in float64, rounded once to x's dtype."""
    y = (x.double() @ qweight.double().t()) * w_scale.double().reshape(1, -1)
    if bias is not None:
        y = y + bias.double()
    return y.to(x.dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_w8a16_matches_exact_reference(shape, dtype, variant, rng, device):
    from comfyui_octet.kernels.backends import triton_w8a16
    swap, tma = variant
    m, n, k = shape
    x = randn((m, k), rng, dtype, device, scale=2.0)
    qweight, w_scale = torch_ref.quantize_weight(randn((n, k), rng) * positive((n, 1), rng, low=0.2, high=3.0))
    qweight, w_scale = qweight.to(device), w_scale.to(device)
    bias = randn(n, rng, dtype, device) if n % 2 else None
    tma = tma and k % 16 == 0 and dtype != torch.float32
    cfg = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2, "SWAP_AB": swap, "num_warps": 4,
           "num_stages": 1}
    y = triton_w8a16.w8a16_gemm(x, qweight, w_scale, bias, config=cfg, use_tma=tma)
    assert y.dtype == dtype and y.shape == (m, n)
    # Products bf16 x int8 are exact in fp32; only the fp32 sum order and the final rounding differ.
    assert_epilogue_close(y.cpu(), _reference(x.cpu(), qweight.cpu(), w_scale.cpu(),
                                              None if bias is None else bias.cpu()))


def test_w8a16_autotuned_entry_and_empty_k(rng, device):
    from comfyui_octet.kernels.backends import triton_w8a16
    x = randn((5, 64), rng, torch.bfloat16, device)
    qweight, w_scale = torch_ref.quantize_weight(randn((24, 64), rng))
    y = triton_w8a16.w8a16_gemm(x, qweight.to(device), w_scale.to(device), None)
    assert_epilogue_close(y.cpu(), _reference(x.cpu(), qweight, w_scale, None))
    bias = randn(24, rng, torch.bfloat16, device)
    y0 = triton_w8a16.w8a16_gemm(x[:, :0], qweight[:, :0].to(device), w_scale.to(device), bias)
    assert torch.equal(y0.cpu(), bias.cpu().expand(5, 24))


def test_w8a16_rejects_bad_operands(rng, device):
    from comfyui_octet.kernels.backends import triton_w8a16
    x = randn((4, 32), rng, torch.bfloat16, device)
    q = torch.zeros((8, 16), dtype=torch.int8, device=device)
    with pytest.raises(ValueError, match="qweight must be int8"):
        triton_w8a16.w8a16_gemm(x, q, torch.ones(8, device=device), None)
    with pytest.raises(ValueError, match="w_scale"):
        triton_w8a16.w8a16_gemm(x, torch.zeros((8, 32), dtype=torch.int8, device=device), torch.ones(3), None)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(41, 341), (3, 5000), (1, 8)])
def test_one_pass_dequantize_equals_reference(shape, dtype, rng, device):
    """The large-M weight-only path dequantizes in one launch: bit for bit torch_ref's weight."""
    from comfyui_octet.kernels.backends import triton_w8a16
    qweight, w_scale = torch_ref.quantize_weight(randn(shape, rng) * positive((shape[0], 1), rng, low=0.2, high=3.0))
    w = triton_w8a16.dequantize_weight(qweight.to(device), w_scale.to(device), dtype)
    expected = torch_ref.dequantize_weight(qweight, w_scale, dtype)
    assert w.dtype == dtype
    if dtype == torch.bfloat16 and device == "cpu":
        # The CPU interpreter (numpy has no bf16) does not round fp32 -> bf16 to nearest: one bf16 ulp.
        torch.testing.assert_close(w.float(), expected.float(), rtol=2 ** -7, atol=0)
    else:
        assert torch.equal(w.cpu(), expected)


def test_w8a16_linear_matches_reference_on_both_sides_of_the_crossover(rng, device):
    """w8a16_linear: the fused kernel at small M (and always off CUDA), one-pass dequantize + cuBLAS
    at large M (on a GPU); either way the reference's numbers."""
    from comfyui_octet.kernels.backends import triton_w8a16
    qweight, w_scale = torch_ref.quantize_weight(randn((24, 64), rng))
    bias = randn(24, rng, torch.bfloat16, device)
    for m in (3, 1030):
        x = randn((m, 64), rng, torch.bfloat16, device)
        y = triton_w8a16.w8a16_linear(x, qweight.to(device), w_scale.to(device), bias)
        expected = torch_ref.linear_w8a16(x.float().cpu(), qweight, w_scale, bias.float().cpu())
        assert_epilogue_close(y.cpu(), expected.to(torch.bfloat16))
    assert triton_w8a16.prefers_dequant_cublas(1030, 24) and not triton_w8a16.prefers_dequant_cublas(3, 24)


def test_w8a16_takes_an_unaligned_view_at_descriptor_sizes(rng, device):
    """At M >= TMA_MIN_M the activations come through a TMA descriptor, whose base must be 16-byte
    aligned; a view starting 2 bytes into its storage goes through pointer loads instead of failing."""
    from comfyui_octet.kernels.backends import triton_w8a16
    m, k, n = triton_w8a16.TMA_MIN_M, 32, 16
    qweight, w_scale = torch_ref.quantize_weight(randn((n, k), rng))
    storage = randn((m * k + 1,), rng, torch.bfloat16, device)
    x = storage[1:].view(m, k)
    assert x.data_ptr() % 16 != 0
    y = triton_w8a16.w8a16_gemm(x, qweight.to(device), w_scale.to(device), None)
    expected = torch_ref.linear_w8a16(x.float().cpu(), qweight, w_scale, None)
    assert_epilogue_close(y.cpu(), expected.to(torch.bfloat16))


def test_w8a16_linear_keeps_the_reference_numbers_on_repeated_calls(rng, device):
    """A plan calls one W8A16Linear every step; from the second call at an input's (shape, dtype) the
    dequantize + cuBLAS side takes a bound call (the C launcher, grid and arguments fixed) whose float weight
    is the stream's scratch, shared by every layer (scratch.weight_on_stream): every call, whichever shape,
    dtype and layer came before it, must give the reference's numbers. Outputs are compared after all calls
    were issued, so a layer overwriting a weight another's GEMM still reads would show."""
    from comfyui_octet.kernels.backends import triton_launch, triton_w8a16
    layers = []
    for n in (24, 40):
        qweight, w_scale = torch_ref.quantize_weight(randn((n, 64), rng))
        bias = randn(n, rng, torch.bfloat16, device)
        layers.append((triton_w8a16.W8A16Linear(qweight.to(device), w_scale.to(device), bias), qweight, w_scale, bias))
    issued = []
    for m, dtype in [(1030, torch.bfloat16), (1030, torch.bfloat16), (3, torch.bfloat16), (1030, torch.float16),
                     (1030, torch.bfloat16), (2048, torch.bfloat16), (1030, torch.float16), (3, torch.bfloat16)]:
        x = randn((m, 64), rng, dtype, device)
        for linear, qweight, w_scale, bias in layers:
            issued.append((linear(x), x, qweight, w_scale, bias))
    for y, x, qweight, w_scale, bias in issued:
        expected = torch_ref.linear_w8a16(x.float().cpu(), qweight, w_scale, bias.float().cpu())
        assert_epilogue_close(y.cpu(), expected.to(x.dtype))
    linear = layers[0][0]
    if torch.device(device).type == "cuda" and triton_launch.enabled():
        assert callable(linear._bound[(torch.Size((1030, 64)), torch.bfloat16)])
        assert linear._bound[(torch.Size((3, 64)), torch.bfloat16)] is False   # the fused kernel's side
