"""Activation quantization kernels against torch_ref: the int8 values and scales must be identical."""
import pytest
import torch

from comfyui_octet.kernels import torch_ref
from kernel_testing import positive, randn, requires_triton

pytestmark = requires_triton

ROW_SHAPES = [(9, 341), (1, 8), (33, 96), (3, 1536), (3, 2500), (2, 17000)]  # 1536: one 2048 tile; > 2048: two sweeps


@pytest.mark.parametrize("shape", ROW_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("smoothed", [False, True])
@pytest.mark.parametrize("static", [False, True])
def test_quantize_rows_matches_reference(shape, dtype, smoothed, static, rng, device):
    from comfyui_octet.kernels.backends import triton_quant
    x = randn(shape, rng, dtype, device, scale=3.0)
    smooth = positive(shape[1], rng, device) if smoothed else None
    static_scale = (positive(1, rng, device, 0.01, 0.05)) if static else None
    q, s = triton_quant.quantize_rows(x, smooth, static_scale)
    q_ref, s_ref = torch_ref.quantize_rows(x, smooth, static_scale)
    assert q.dtype == torch.int8 and q.shape == x.shape
    assert torch.equal(q, q_ref)
    assert torch.equal(s, s_ref.reshape(-1))
    if static and x.numel() >= 256:  # the static scale clips: both extremes must be reached
        assert q.max() == 127 and q.min() == -127


def test_quantize_rows_rounds_half_to_even(device):
    from comfyui_octet.kernels.backends import triton_quant
    # x / 1 lands exactly on .5: half-to-even gives 0, 2, 2, -2, 4, 126; clamps at +-127.
    x = torch.tensor([[0.5, 1.5, 2.5, -2.5, 3.5, 126.5, 300.0, -300.0]], device=device)
    q, _ = triton_quant.quantize_rows(x, None, torch.ones(1, device=device))
    assert q.tolist() == [[0, 2, 2, -2, 4, 126, 127, -127]]


def test_quantize_rows_zero_row_gives_zeros_not_nan(rng, device):
    from comfyui_octet.kernels.backends import triton_quant
    x = randn((3, 40), rng, torch.float32, device)
    x[1] = 0.0
    q, s = triton_quant.quantize_rows(x)
    assert torch.isfinite(s).all() and (q[1] == 0).all()
    assert torch.equal(q, torch_ref.quantize_rows(x)[0])


@pytest.mark.parametrize("shape", [(2, 5, 9, 7), (1, 64, 8, 8), (3, 3, 1, 13)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("smoothed", [False, True])
@pytest.mark.parametrize("static", [False, True])
def test_quantize_per_sample_nhwc_matches_reference(shape, dtype, smoothed, static, rng, device):
    from comfyui_octet.kernels.backends import triton_quant
    x = randn(shape, rng, dtype, device, scale=2.0)
    smooth = positive(shape[1], rng, device) if smoothed else None
    static_scale = positive(1, rng, device, 0.01, 0.05) if static else None
    q, s = triton_quant.quantize_per_sample_nhwc(x, smooth, static_scale)
    q_ref, s_ref = torch_ref.quantize_per_sample(x, smooth, static_scale)
    assert q.shape == (shape[0], shape[2], shape[3], shape[1]) and q.is_contiguous()
    assert torch.equal(q.permute(0, 3, 1, 2), q_ref)
    assert torch.equal(s, s_ref.reshape(-1))


def test_quantize_per_sample_reads_channels_last(rng, device):
    from comfyui_octet.kernels.backends import triton_quant
    x = randn((2, 6, 5, 4), rng, torch.float16, device).to(memory_format=torch.channels_last)
    q, s = triton_quant.quantize_per_sample_nhwc(x)
    q_ref, s_ref = torch_ref.quantize_per_sample(x)
    assert torch.equal(q.permute(0, 3, 1, 2), q_ref) and torch.equal(s, s_ref)


def test_quantize_rows_2d_bf16_default_arguments(rng, device):
    from comfyui_octet.kernels.backends import triton_quant
    x = randn((5, 48), rng, torch.bfloat16, device)
    q, s = triton_quant.quantize_rows(x, None, None)
    q_ref, s_ref = torch_ref.quantize_rows(x)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref.reshape(-1))


def test_prepared_quantizers_name_the_width_they_were_made_for(device):
    """A layer's quantizer called on activations of another width: a ValueError naming both widths."""
    from comfyui_octet.kernels.backends import triton_quant
    with pytest.raises(ValueError, match=r"rows of K=32, activations have K=16"):
        triton_quant.RowQuantizer(32)(torch.zeros(4, 16, device=device))
    with pytest.raises(ValueError, match=r"C=8 channels \(its smooth has that many entries\), activations have C=4"):
        triton_quant.SampleQuantizer(8, torch.ones(8, device=device))(torch.zeros(1, 4, 2, 2, device=device))
