"""INT8 implicit-GEMM conv against torch_ref (same integers) and against float F.conv2d."""
import pytest
import torch
import torch.nn.functional as F

from comfyui_octet import kernels
from comfyui_octet.kernels import torch_ref
from kernel_testing import assert_epilogue_close, positive, randn, requires_triton, sqnr_db

pytestmark = requires_triton

# (N, C, H, W, OC, kernel, stride, padding, dilation)
CASES = [
    (2, 5, 9, 7, 6, 3, 1, 1, 1),      # 3x3 same, odd sizes, C < one K step
    (1, 40, 10, 11, 24, 3, 2, 1, 1),  # 3x3 stride 2 (downsample), C not a tile multiple
    (2, 16, 6, 5, 20, 1, 1, 0, 1),    # 1x1: plain GEMM over pixels
    (1, 8, 9, 9, 12, 1, 2, 0, 1),     # 1x1 stride 2
    (1, 6, 12, 10, 7, 3, 1, 2, 2),    # dilation 2
    (1, 3, 8, 8, 5, 3, 1, 0, 1),      # no padding
    (2, 64, 5, 6, 40, 3, 1, 1, 1),    # C % 64 == 0: weight through a TMA descriptor (Hopper path)
    (1, 128, 4, 5, 24, 1, 1, 0, 1),   # 1x1 with the TMA weight
]


def _conv_weights(oc, c, k, rng, device):
    w = randn((oc, c, k, k), rng) * positive((oc, 1, 1, 1), rng, low=0.2, high=3.0)
    qweight, w_scale = torch_ref.quantize_weight(w)
    return w, qweight.to(device), w_scale.to(device)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("act", ["dynamic", "static"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_conv_matches_reference(case, dtype, act, with_bias, rng, device):
    nb, c, h, w_, oc, k, stride, padding, dilation = case
    x = randn((nb, c, h, w_), rng, dtype, device, scale=2.0)
    _, qweight, w_scale = _conv_weights(oc, c, k, rng, device)
    bias = randn(oc, rng, dtype, device) if with_bias else None
    static_scale = positive(1, rng, device, 0.02, 0.06) if act == "static" else None
    y = kernels.conv2d(x, qweight, w_scale, bias, stride, padding, dilation, act=act,
                       static_scale=static_scale, backend="triton")
    expected = torch_ref.conv2d_w8a8(x, qweight, w_scale, bias, stride, padding, dilation, 1, None, static_scale)
    assert y.is_contiguous()
    assert_epilogue_close(y, expected)


@pytest.mark.parametrize("case", CASES[:3])
def test_conv_with_smoothing_matches_reference(case, rng, device):
    nb, c, h, w_, oc, k, stride, padding, dilation = case
    x = randn((nb, c, h, w_), rng, torch.bfloat16, device)
    _, qweight, w_scale = _conv_weights(oc, c, k, rng, device)
    smooth = positive(c, rng, device)
    y = kernels.conv2d(x, qweight, w_scale, None, stride, padding, dilation, smooth=smooth, backend="triton")
    assert_epilogue_close(y, torch_ref.conv2d_w8a8(x, qweight, w_scale, None, stride, padding, dilation, 1, smooth))


@pytest.mark.parametrize("kernel,stride,padding", [(3, 1, 1), (3, 2, 1), (1, 1, 0), (1, 2, 0), (3, 1, 0)])
def test_conv_is_close_to_float_conv(kernel, stride, padding, rng, device):
    x = randn((2, 48, 12, 12), rng, torch.float32, device)
    w, qweight, w_scale = _conv_weights(32, 48, kernel, rng, device)
    bias = randn(32, rng, device=device)
    y = kernels.conv2d(x, qweight, w_scale, bias, stride, padding, act="dynamic", backend="triton")
    expected = F.conv2d(x, w.to(device), bias, stride, padding)
    # Per-sample INT8 activations of Gaussian data: ~30 dB; 22 dB fails on any indexing bug.
    assert sqnr_db(y, expected) > 22


def test_conv_channels_last_in_channels_last_out(rng, device):
    x = randn((2, 8, 7, 9), rng, torch.float16, device).to(memory_format=torch.channels_last)
    _, qweight, w_scale = _conv_weights(10, 8, 3, rng, device)
    y = kernels.conv2d(x, qweight, w_scale, None, 1, 1, backend="triton")
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert_epilogue_close(y, torch_ref.conv2d_w8a8(x, qweight, w_scale, None, 1, 1, 1, 1))


def test_conv_padding_same_and_weight_only(rng, device):
    x = randn((1, 4, 6, 6), rng, torch.float32, device)
    w, qweight, w_scale = _conv_weights(5, 4, 3, rng, device)
    y = kernels.conv2d(x, qweight, w_scale, None, 1, "same", backend="triton")
    assert_epilogue_close(y, torch_ref.conv2d_w8a8(x, qweight, w_scale, None, 1, 1, 1, 1))
    y = kernels.conv2d(x, qweight, w_scale, None, 1, 1, act="none", backend="triton")
    torch.testing.assert_close(y, torch_ref.conv2d_w8a16(x, qweight, w_scale, None, 1, 1, 1, 1))


def test_grouped_conv_is_rejected_by_triton_and_still_computed(rng, device):
    x = randn((1, 4, 5, 5), rng, torch.float32, device)
    w, qweight, w_scale = _conv_weights(4, 2, 3, rng, device)
    from comfyui_octet.kernels import registry
    req = registry.Request("conv2d", "dynamic", x.device.type, "float32", 25, 4, 18, groups=2)
    assert registry.select(req, "triton").name != "triton"
    y = kernels.conv2d(x, qweight, w_scale, None, 1, 1, 1, 2, backend="triton")
    assert sqnr_db(y, F.conv2d(x, w.to(device), None, 1, 1, 1, 2)) > 22
