"""quantize_, the report, and the safetensors checkpoint format (core only, no ComfyUI)."""
import json
import os

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open

from comfyui_octet import octet
from comfyui_octet.octet import checkpoint, safefile
from comfyui_octet.octet.api import OctetError


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(3, 16, 3, padding=1)
        self.norm = nn.GroupNorm(4, 16)
        self.down = nn.Conv2d(16, 16, 3, stride=2, padding=1)
        self.circ = nn.Conv2d(16, 16, 3, padding=1, padding_mode="circular")
        self.proj = nn.Linear(16, 32)
        self.out = nn.Linear(32, 8, bias=False)

    def forward(self, x):
        h = self.circ(self.down(self.norm(self.conv_in(x))))
        return self.out(torch.relu(self.proj(h.mean((2, 3)))))


def _toy(rng):
    m = Toy()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=rng) * 0.2)
    return m.eval()


def test_quantize_reports_each_layer_and_keeps_the_function(rng):
    model = _toy(rng)
    x = torch.randn(2, 3, 12, 12, generator=rng)
    ref = model(x)
    result = octet.quantize_(model, octet.DynamicW8A8Config())
    by_name = {r.name: r for r in result.layers}
    assert set(by_name) == {"conv_in", "down", "circ", "proj", "out"}
    assert by_name["circ"].decision == "skipped" and "padding_mode" in by_name["circ"].reason
    assert all(by_name[n].decision == "dynamic" for n in ("conv_in", "down", "proj", "out"))
    assert isinstance(model.proj, octet.QuantLinear) and isinstance(model.down, octet.QuantConv2d)
    assert isinstance(model.circ, nn.Conv2d) and not isinstance(model.circ, octet.QuantConv2d)
    rel = (model(x) - ref).norm() / ref.norm()
    assert rel < 0.05, rel
    assert result.bytes_after < 0.3 * result.bytes_before  # fp32 -> int8 + per-channel scales
    assert "skipped" in result.to_text()


def test_kind_selection_and_inplace_false_leave_the_model_untouched(rng):
    model = _toy(rng)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = octet.quantize_(model, octet.WeightOnlyConfig(kinds=("linear",)), inplace=False)
    assert set(result.replacements) == {"proj", "out"}
    assert {r.name for r in result.skipped} == {"conv_in", "down", "circ"}
    assert type(model.proj) is nn.Linear
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_model_without_quantizable_layers_is_a_clear_error():
    with pytest.raises(OctetError, match="no Linear or Conv2d"):
        octet.quantize_(nn.Sequential(nn.GroupNorm(2, 4), nn.SiLU()), octet.DynamicW8A8Config())


def test_static_mode_without_calibration_says_to_run_calibrate(rng):
    with pytest.raises(OctetError, match="Calibrate"):
        octet.quantize_(_toy(rng), octet.StaticW8A8Config())


@pytest.mark.parametrize("kwargs,match", [({"kinds": ()}, "kinds"), ({"kinds": ("attention",)}, "kind"),
                                          ({"backend": "cuda"}, "backend")])
def test_bad_config_values_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        octet.DynamicW8A8Config(**kwargs)


def test_config_round_trips_through_dict():
    c = octet.StaticW8A8Config(kinds=("linear",), observer="mse", smooth_alpha=0.5)
    assert octet.config_from_dict(json.loads(json.dumps(c.to_dict()))) == c


def _saved(tmp_path, rng, mode="dynamic"):
    model = _toy(rng)
    octet.quantize_(model, octet.config_for_mode(mode))
    path = str(tmp_path / "toy.safetensors")
    checkpoint.save(path, model, {"architecture": "Toy"})
    return model, path


def test_checkpoint_follows_the_host_convention(tmp_path, rng):
    model, path = _saved(tmp_path, rng)
    with safe_open(path, "pt") as f:
        meta, keys = f.metadata(), set(f.keys())
        assert f.get_tensor("proj.weight").dtype == torch.int8
        assert f.get_tensor("proj.weight_scale").dtype == torch.float32
        assert f.get_tensor("proj.weight_scale").shape == (32, 1)
        spec = json.loads(bytes(f.get_tensor("proj.comfy_quant").tolist()))
        conv_spec = json.loads(bytes(f.get_tensor("down.comfy_quant").tolist()))
    assert spec["format"] == "int8_tensorwise" and conv_spec["format"] == "octet_int8"
    assert conv_spec["octet"]["stride"] == [2, 2]
    assert "circ.weight" in keys and "circ.comfy_quant" not in keys  # float layers stay float
    # The conv is Octet-only, so the header's table (what a stock host acts on) refuses the file,
    # through the Linear, whose lookup in the host's format table fails with that message.
    table = json.loads(meta["_quantization_metadata"])["layers"]
    assert table["proj"] == table["down"] == {"format": checkpoint.fileformat.HOST_REFUSAL}
    assert json.loads(meta["octet"])["format_version"] == checkpoint.FORMAT_VERSION


def test_round_trip_is_bit_exact_and_computes_the_same(tmp_path, rng):
    model, path = _saved(tmp_path, rng)
    fresh = _toy(rng)  # other float weights: all must come from the file
    checkpoint.install(fresh, checkpoint.read(path))
    for k, v in model.state_dict().items():
        assert torch.equal(v, fresh.state_dict()[k]), k
    x = torch.randn(2, 3, 12, 12, generator=rng)
    assert torch.equal(model(x), fresh(x))


def test_host_comfy_kitchen_decodes_our_int8_tensorwise_layers_identically(tmp_path, rng):
    ck_tensor = pytest.importorskip("comfy_kitchen.tensor")
    model, path = _saved(tmp_path, rng)
    ckpt = checkpoint.read(path)
    layout = ck_tensor.TensorWiseINT8Layout
    w, s = ckpt.tensors["proj.weight"], ckpt.tensors["proj.weight_scale"]
    params = layout.Params(scale=s, orig_dtype=torch.float32, orig_shape=tuple(w.shape))
    qt = ck_tensor.QuantizedTensor(w, "TensorWiseINT8Layout", params)
    torch.testing.assert_close(qt.dequantize(), model.proj.dequantized_weight(torch.float32), rtol=0, atol=0)
    x = torch.randn(5, 16, generator=rng)
    host_y = torch.nn.functional.linear(x, qt, ckpt.tensors["proj.bias"])
    torch.testing.assert_close(host_y, model.proj(x), rtol=1e-4, atol=1e-4)


def test_truncated_file_is_reported_as_corrupt_and_left_alone(tmp_path, rng):
    _, path = _saved(tmp_path, rng)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(OctetError, match="corrupted or truncated"):
        checkpoint.read(path)
    assert os.path.getsize(path) == len(data) // 2


def test_garbage_file_is_reported_as_corrupt(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(os.urandom(256))
    with pytest.raises(OctetError, match="corrupted or truncated"):
        checkpoint.read(str(path))


def test_plain_float_checkpoint_is_not_mistaken_for_a_quantized_one(tmp_path, rng):
    from safetensors.torch import save_file
    path = str(tmp_path / "float.safetensors")
    save_file({k: v.contiguous() for k, v in _toy(rng).state_dict().items()}, path)
    with pytest.raises(OctetError, match="not an Octet/comfy_quant INT8 checkpoint"):
        checkpoint.read(path)


def test_checkpoint_for_another_architecture_is_refused(tmp_path, rng):
    _, path = _saved(tmp_path, rng)
    other = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 8))
    with pytest.raises(OctetError, match="does not fit this architecture"):
        checkpoint.install(other, checkpoint.read(path))


def test_newer_format_version_asks_to_update(tmp_path, rng):
    model = _toy(rng)
    octet.quantize_(model, octet.DynamicW8A8Config())
    path = str(tmp_path / "new.safetensors")
    checkpoint.save(path, model, {"format_version": checkpoint.FORMAT_VERSION + 1})
    with pytest.raises(OctetError, match="Update the Octet"):
        checkpoint.read(path)


def test_failed_save_leaves_the_existing_file_and_no_temp_file(tmp_path, rng, monkeypatch):
    model, path = _saved(tmp_path, rng)
    original = open(path, "rb").read()

    def broken_write(f, data):
        f.write(data[:7])
        raise OSError("disk full")
    monkeypatch.setattr(safefile, "write_chunks", broken_write)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save(path, model, {})
    assert open(path, "rb").read() == original
    assert os.listdir(tmp_path) == ["toy.safetensors"]


def test_saving_a_float_model_is_refused(tmp_path, rng):
    with pytest.raises(OctetError, match="no quantized layer"):
        checkpoint.save(str(tmp_path / "f.safetensors"), _toy(rng), {})
    assert not os.listdir(tmp_path)
