"""Octet inside the real ComfyUI: the custom-node loader, the host sampler, ModelPatcher load paths."""
import asyncio
import importlib
import os

import pytest
import torch

from comfyui_octet.nodes import bridge, extension, model_files
from comfyui_octet.fixtures import reference_model
from comfyui_octet.octet import config_for_mode
from comfyui_octet.octet.api import OctetError
from comfyui_octet.octet.modules import QuantLayer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OCTET_NODE_IDS = {cls.GET_SCHEMA().node_id for cls in extension.NODES}


def _psnr(a, b):
    mse = ((a.double() - b.double()) ** 2).mean()
    return float(10 * torch.log10((a.double().max() - a.double().min()) ** 2 / mse))


@pytest.fixture(scope="module")
def loaded_pack():
    import nodes
    assert asyncio.run(nodes.load_custom_node(ROOT)) is True
    return {k: v for k, v in nodes.NODE_CLASS_MAPPINGS.items() if k in OCTET_NODE_IDS}


def test_comfyui_custom_node_loader_registers_every_node_with_a_valid_schema(loaded_pack):
    assert {"OctetQuantizeModel", "OctetSaveQuantized", "OctetLoadQuantized"} <= OCTET_NODE_IDS
    assert all(node_id.startswith("Octet") for node_id in OCTET_NODE_IDS)  # no clash with other packs
    assert set(loaded_pack) == OCTET_NODE_IDS
    for node_id, cls in loaded_pack.items():
        info = cls.GET_NODE_INFO_V1()
        assert info["name"] == node_id and info["category"].startswith("octet")
        inputs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        for name, spec in inputs.items():
            assert spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"


@pytest.mark.parametrize("mode,min_psnr", [("weight_only", 40.0), ("dynamic", 35.0)])
def test_quantized_model_samples_close_to_float_and_leaves_the_source_unchanged(tiny_model, sample, mode,
                                                                               min_psnr):
    fp = sample(tiny_model)
    quantized, result = bridge.quantize_model(tiny_model, config_for_mode(mode))
    q = sample(quantized)
    assert torch.isfinite(q).all() and not torch.equal(q, fp)
    assert _psnr(fp, q) > min_psnr
    assert result.ratio_vs_bf16 <= 0.55
    # The source MODEL still samples bit-identically, and its modules are float again.
    assert torch.equal(sample(tiny_model), fp)
    assert not any(isinstance(m, QuantLayer) for m in tiny_model.model.diffusion_model.modules())


def test_quantize_node_through_v3_execute(tiny_model, loaded_pack):
    node = loaded_pack["OctetQuantizeModel"]
    out = node.execute(model=tiny_model, mode="dynamic", quantize_linear=True, quantize_conv=False, backend="auto")
    model, report = out.result
    # The loader imported its own copy of the pack; ask that copy's bridge.
    pack_bridge = importlib.import_module(node.__module__.rsplit(".", 1)[0] + ".bridge")
    layers = pack_bridge.quantized_layers(model)
    assert layers and all(type(m).__name__ == "QuantLinear" for m in layers.values())
    assert "kind 'conv' not selected" in report


def test_save_load_round_trip_is_bit_exact_and_samples_identically(tiny_model, sample, tmp_path):
    quantized, _ = bridge.quantize_model(tiny_model, config_for_mode("dynamic"))
    path = str(tmp_path / "tiny_int8.safetensors")
    model_files.save_model(quantized, path)
    loaded = model_files.load_model(path)
    saved_layers, loaded_layers = bridge.quantized_layers(quantized), bridge.quantized_layers(loaded)
    assert set(saved_layers) == set(loaded_layers)
    for name, layer in saved_layers.items():
        for k, v in layer.state_dict().items():
            assert torch.equal(v, loaded_layers[name].state_dict()[k]), (name, k)
    assert torch.equal(sample(quantized), sample(loaded))
    bf16_bytes = 2 * sum(p.numel() for p in tiny_model.model.diffusion_model.parameters())
    assert os.path.getsize(path) < 0.6 * bf16_bytes


def test_lowvram_partial_load_computes_the_same_as_a_full_load(tiny_model):
    quantized, _ = bridge.quantize_model(tiny_model, config_for_mode("dynamic"))
    x = torch.randn(1, 4, 16, 16)
    t = torch.tensor([500.0])
    ctx = reference_model.tiny_conditioning(seed=3)[0][0]
    cpu = torch.device("cpu")

    def run(lowvram_bytes):
        quantized.patch_model(device_to=cpu, lowvram_model_memory=lowvram_bytes)
        try:
            lowvram = [m for m in quantized.model.diffusion_model.modules()
                       if isinstance(m, QuantLayer) and m.comfy_cast_weights]
            return quantized.model.diffusion_model(x, t, context=ctx), len(lowvram)
        finally:
            quantized.unpatch_model(device_to=cpu)

    full, n_full = run(0)
    partial, n_partial = run(1)  # 1 byte of "VRAM": every layer takes the cast-per-call path
    assert n_full == 0 and n_partial > 0
    assert torch.equal(full, partial)


def test_weight_functions_reach_the_dequantized_weight(tiny_model):
    quantized, _ = bridge.quantize_model(tiny_model, config_for_mode("dynamic"))
    layer = next(iter(bridge.quantized_layers(quantized).values()))
    x = torch.randn(3, layer.in_features) if hasattr(layer, "in_features") else None
    layer.weight_function = [lambda w: w * 2]  # what ComfyUI's LowVramPatch/LoRA hooks do
    try:
        expected = torch.nn.functional.linear(x, layer.dequantized_weight() * 2,
                                              layer.bias) if x is not None else None
        if x is not None:
            torch.testing.assert_close(layer(x), expected)
    finally:
        layer.weight_function = []


def test_quantizing_twice_and_wrong_inputs_are_clear_errors(tiny_model):
    quantized, _ = bridge.quantize_model(tiny_model, config_for_mode("dynamic"))
    with pytest.raises(OctetError, match="already quantized"):
        bridge.quantize_model(quantized, config_for_mode("dynamic"))
    with pytest.raises(OctetError, match="diffusion MODEL"):
        bridge.quantize_model(object(), config_for_mode("dynamic"))
    with pytest.raises(OctetError, match="no Octet-quantized layers"):
        model_files.save_model(tiny_model, "/tmp/never-written.safetensors")
    assert not os.path.exists("/tmp/never-written.safetensors")


def test_checkpoint_claiming_another_architecture_is_refused(tiny_model, tmp_path):
    import json
    from safetensors import safe_open
    from safetensors.torch import save_file
    quantized, _ = bridge.quantize_model(tiny_model, config_for_mode("dynamic"))
    path = str(tmp_path / "q.safetensors")
    model_files.save_model(quantized, path)
    with safe_open(path, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    header = json.loads(meta["octet"])
    header["unet_config"]["model_channels"] = 64  # the same family, other shapes
    meta["octet"] = json.dumps(header)
    bad = str(tmp_path / "bad.safetensors")
    save_file(tensors, bad, metadata=meta)
    with pytest.raises(OctetError, match="does not fit this architecture"):
        model_files.load_model(bad)
    header["architecture"] = "NotAModel"
    meta["octet"] = json.dumps(header)
    save_file(tensors, bad, metadata=meta)
    with pytest.raises(OctetError, match="does not know"):
        model_files.load_model(bad)


def test_unloading_an_int8_model_gives_back_a_streamed_layers_copy_made_ahead(tiny_model, monkeypatch, sample):
    """A streamed layer's copy made ahead of its call (octet/stream_ahead.py) goes when the host unloads the model,
    not at the next streamed call of whatever runs next; a sampling run's own detach (load_models_gpu hands the
    model over to itself) keeps it."""
    import comfy.model_management as mm
    from comfyui_octet.octet import stream_ahead
    import types
    quantized = bridge.quantize_model(tiny_model, config_for_mode("dynamic"))[0]
    copy = types.SimpleNamespace(ready="its copy's event", device="cuda:0")    # a copy made ahead, stood in for
    waited = []
    monkeypatch.setattr(stream_ahead, "_pending", stream_ahead.collections.deque([copy]))
    monkeypatch.setattr(stream_ahead, "stats", {"ahead": 0, "missed": 0})
    monkeypatch.setattr(stream_ahead, "_after_copy", lambda ready, device: waited.append((ready, device)))
    for _ in range(2):      # the second run's load hands the loaded model over to itself (a detach)
        sample(quantized, steps=1, size=16)
    assert list(stream_ahead._pending) == [copy] and waited == []
    mm.unload_all_models()
    assert not stream_ahead._pending and stream_ahead.stats["missed"] == 1
    # Its memory (allocated on the compute stream) goes back after the compute stream has waited for the copy.
    assert waited == [("its copy's event", "cuda:0")]
