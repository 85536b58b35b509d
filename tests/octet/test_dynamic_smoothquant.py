"""Dynamic W8A8 with SmoothQuant (issue 15): per-token scales plus calibrated channel factors.

Per-token scales follow each row's range, but one loud input channel still sets every row's scale; the
SmoothQuant divisors (from a calibration's per-channel ranges, folded into the weight) flatten it.
"""
import pytest
import torch
import torch.nn as nn

from comfyui_octet.kernels import torch_ref
from comfyui_octet.octet import DynamicW8A8Config, OctetError, StaticW8A8Config, checkpoint, quantize_
from comfyui_octet.octet.config import config_from_dict
from comfyui_octet.octet.policy import Policy

from test_calibration import _Net, _calibrate, _data, _outlier_draw, _sqnr  # noqa: E402  (tests/octet is on sys.path)


def test_config_round_trips_and_checks_alpha():
    c = DynamicW8A8Config(smooth_alpha=0.5)
    assert config_from_dict(c.to_dict()) == c
    assert config_from_dict({"mode": "dynamic"}).smooth_alpha is None  # files written before the field
    with pytest.raises(ValueError, match="smooth_alpha=1.5"):
        DynamicW8A8Config(smooth_alpha=1.5)


def test_without_a_calibration_it_says_what_to_connect(rng):
    with pytest.raises(OctetError, match="SmoothQuant .* needs a CALIBRATION for layer 'conv'"):
        quantize_(_Net(rng), DynamicW8A8Config(smooth_alpha=0.5), inplace=False)


def test_layer_computes_the_reference_and_beats_plain_dynamic_on_outlier_channels(rng):
    gains = []
    for trial in range(12):
        net, cal, t, ref = _outlier_draw(rng)
        smoothed = quantize_(net, DynamicW8A8Config(smooth_alpha=0.5, kinds=("linear",)), calibration=cal,
                             inplace=False).replacements["fc1"]
        plain = quantize_(net, DynamicW8A8Config(kinds=("linear",)), inplace=False).replacements["fc1"]
        with torch.no_grad():
            y = smoothed(t)
            if trial == 0:  # the layer is exactly the oracle: x / s quantized per token, weight * s per row
                s = cal.smoothing_factors("fc1", net.fc1.weight, 0.5)
                qw, ws = torch_ref.quantize_weight(net.fc1.weight.float() * s)
                want = torch_ref.linear_w8a8(t, qw, ws, net.fc1.bias, smooth=s)
                torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
            gains.append(_sqnr(y, ref) - _sqnr(plain(t), ref))
    gains = torch.tensor(gains)
    # x40 channels: plain per-token scales spend ~5 bits on three channels; measured mean gain ~10 dB
    assert gains.mean() > 5, gains


def test_a_policy_that_makes_a_layer_dynamic_keeps_the_smoothing(rng):
    net = _Net(rng)
    cal = _calibrate(net, [_data(rng) for _ in range(2)])
    static_sq = StaticW8A8Config(smooth_alpha=0.5)
    q = quantize_(net, static_sq, policy=Policy(overrides={"fc2": "dynamic"}), calibration=cal, inplace=False)
    assert q.replacements["fc2"].act == "dynamic" and q.replacements["fc2"].pre_quant_scale is not None
    assert q.replacements["fc1"].act == "static" and q.replacements["fc1"].pre_quant_scale is not None
    q = quantize_(net, StaticW8A8Config(), policy=Policy(overrides={"fc2": "dynamic"}), calibration=cal,
                  inplace=False)
    assert q.replacements["fc2"].pre_quant_scale is None


def test_checkpoint_round_trip_is_bit_exact(tmp_path, rng):
    net = _Net(rng)
    cal = _calibrate(net, [_data(rng) for _ in range(2)])
    quantize_(net, DynamicW8A8Config(smooth_alpha=0.5), calibration=cal)
    path = str(tmp_path / "dsq.safetensors")
    checkpoint.save(path, net, {"architecture": "test"})
    fresh = _Net(rng)
    checkpoint.install(fresh, checkpoint.read(path))
    assert fresh.fc1.act == "dynamic" and torch.equal(fresh.fc1.pre_quant_scale, net.fc1.pre_quant_scale)
    x, t = _data(rng)
    with torch.no_grad():
        for a, b in zip(net(x, t), fresh(x, t)):
            assert torch.equal(a, b)
