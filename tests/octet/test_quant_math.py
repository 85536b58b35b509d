"""INT8 math of the reference backend against float64 computations on fresh random inputs."""
import pytest
import torch
import torch.nn.functional as F

from comfyui_octet import kernels
from comfyui_octet.kernels import torch_ref


def _randn(rng, *shape, scale=1.0):
    return torch.randn(*shape, generator=rng, dtype=torch.float64) * scale


@pytest.mark.parametrize("shape", [(41, 341), (8, 3, 3, 3), (1, 17)])
def test_weight_quantization_is_per_channel_symmetric_and_within_half_step(rng, shape):
    w = _randn(rng, *shape) * torch.rand(shape[0], *([1] * (len(shape) - 1)), generator=rng, dtype=torch.float64)
    q, scale = kernels.quantize_weight(w)
    assert q.dtype == torch.int8 and scale.shape == (shape[0], 1)
    rows = w.reshape(shape[0], -1)
    expected_scale = rows.abs().amax(1, keepdim=True) / 127
    torch.testing.assert_close(scale.double(), expected_scale, rtol=1e-6, atol=0)
    # The largest magnitude of each row lands exactly on +-127, and no code is -128.
    assert (q.reshape(shape[0], -1).abs().amax(1) == 127).all() and q.min() >= -127
    err = (kernels.dequantize_weight(q, scale, torch.float64) - w).reshape(shape[0], -1).abs()
    assert (err <= scale.double() / 2 + 1e-7).all()


def test_all_zero_row_quantizes_to_zero_without_nan(rng):
    w = _randn(rng, 4, 16)
    w[2] = 0
    q, scale = kernels.quantize_weight(w)
    assert torch.isfinite(scale).all() and (q[2] == 0).all()


def test_per_token_activation_quantization_matches_direct_computation(rng):
    x = _randn(rng, 9, 33) * _randn(rng, 9, 1).abs()
    q, s = torch_ref.quantize_rows(x)
    expected = (x.abs().amax(1, keepdim=True) / 127)
    torch.testing.assert_close(s.double(), expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(q.double(), torch.round(x / s.double()).clamp(-127, 127), atol=1, rtol=0)


@pytest.mark.parametrize("m,n,k", [(9, 41, 341), (1, 17, 8), (33, 64, 96)])
@pytest.mark.parametrize("bias", [True, False])
def test_w8a8_linear_equals_float64_product_of_dequantized_operands(rng, m, n, k, bias):
    x, w = _randn(rng, m, k).float(), _randn(rng, n, k).float()
    b = _randn(rng, n).float() if bias else None
    qw, ws = kernels.quantize_weight(w)
    y = kernels.linear(x, qw, ws, b, act="dynamic", backend="torch")
    qx, xs = torch_ref.quantize_rows(x)
    ref = (qx.double() * xs.double()) @ (qw.double() * ws.double()).t()
    if b is not None:
        ref = ref + b.double()
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("act,tol", [("none", 0.01), ("dynamic", 0.02)])
def test_int8_linear_is_close_to_float_linear(rng, act, tol):
    x, w, b = _randn(rng, 2, 7, 256).float(), _randn(rng, 128, 256).float() / 16, _randn(rng, 128).float()
    qw, ws = kernels.quantize_weight(w)
    y = kernels.linear(x, qw, ws, b, act=act)
    ref = F.linear(x.double(), w.double(), b.double())
    rel = (y.double() - ref).norm() / ref.norm()
    assert y.shape == (2, 7, 128) and rel < tol, rel


def test_static_linear_clamps_outside_the_calibrated_range(rng):
    x, w = _randn(rng, 5, 64).float(), _randn(rng, 32, 64).float()
    qw, ws = kernels.quantize_weight(w)
    amax = x.abs().max()
    scale = (amax / 127).reshape(1)
    y_static = kernels.linear(x, qw, ws, None, act="static", static_scale=scale)
    qx = torch.round(x / scale).clamp(-127, 127)
    ref = (qx.double() * scale.double()) @ (qw.double() * ws.double()).t()
    torch.testing.assert_close(y_static.double(), ref, rtol=1e-5, atol=1e-5)
    # Half the range: large activations saturate, so the error grows.
    y_half = kernels.linear(x, qw, ws, None, act="static", static_scale=scale / 2)
    full = F.linear(x.double(), w.double())
    assert (y_half.double() - full).norm() > (y_static.double() - full).norm()


def test_static_without_scale_is_a_clear_error(rng):
    qw, ws = kernels.quantize_weight(_randn(rng, 4, 8))
    with pytest.raises(ValueError, match="Calibrate"):
        kernels.linear(torch.randn(2, 8), qw, ws, act="static")


@pytest.mark.parametrize("stride,padding,ksize", [(1, 1, 3), (2, 1, 3), (1, 0, 1), (2, 0, 1)])
@pytest.mark.parametrize("act", ["none", "dynamic"])
def test_int8_conv_matches_float_conv_of_dequantized_operands(rng, stride, padding, ksize, act):
    x = _randn(rng, 2, 6, 9, 11).float()
    w, b = _randn(rng, 10, 6, ksize, ksize).float(), _randn(rng, 10).float()
    qw, ws = kernels.quantize_weight(w)
    y = kernels.conv2d(x, qw, ws, b, stride, padding, act=act)
    wd = qw.double() * ws.double().reshape(-1, 1, 1, 1)
    if act == "dynamic":
        qx, xs = torch_ref.quantize_per_sample(x)
        xd = qx.double() * xs.double().reshape(-1, 1, 1, 1)
    else:
        xd = x.double()
    ref = F.conv2d(xd, wd, b.double(), stride, padding)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    full = F.conv2d(x.double(), w.double(), b.double(), stride, padding)
    assert (y.double() - full).norm() / full.norm() < 0.03


def test_smoothing_divides_activation_channels_before_quantization(rng):
    x, w = _randn(rng, 6, 32).float(), _randn(rng, 16, 32).float()
    x[:, 3] *= 50  # an outlier channel
    s = x.abs().amax(0).sqrt()
    qw, ws = kernels.quantize_weight(w * s)
    y = kernels.linear(x, qw, ws, None, act="dynamic", smooth=s)
    full = F.linear(x.double(), w.double())
    qw0, ws0 = kernels.quantize_weight(w)
    y0 = kernels.linear(x, qw0, ws0, None, act="dynamic")
    assert (y.double() - full).norm() < (y0.double() - full).norm()


def test_unknown_backend_lists_the_registered_ones():
    with pytest.raises(KeyError, match="torch"):
        kernels.registry.get("nope")
