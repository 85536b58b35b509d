"""The streaming converter: its files equal what Quantize Model + Save Quantized write, and load."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from comfyui_octet.nodes import bridge, model_files
from comfyui_octet.octet import fileformat
from comfyui_octet.octet.api import OctetError
from comfyui_octet.octet.config import config_for_mode
from comfyui_octet.octet.convert import convert
from comfyui_octet.octet.presets import build_policy
from comfyui_octet.octet.streamfile import StreamWriter

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def detectable():
    """The host's architecture detection, taught the tiny reference UNet (a file without an
    architecture record is rebuilt through detection, like the host's own loader does)."""
    import comfy.supported_models
    from comfyui_octet.fixtures import reference_model

    class TinySD15(comfy.supported_models.SD15):
        unet_config = {"context_dim": reference_model.CONTEXT_DIM, "model_channels": 32,
                       "use_linear_in_transformer": False, "adm_in_channels": None, "use_temporal_attention": False}

    comfy.supported_models.models.insert(0, TinySD15)
    yield
    comfy.supported_models.models.remove(TinySD15)


@pytest.fixture
def source(tiny_model, tmp_path):
    sd = {k: v.detach().contiguous() for k, v in bridge.diffusion_model(tiny_model).state_dict().items()}
    path = str(tmp_path / "tiny.safetensors")
    save_file(sd, path)
    return path


@pytest.mark.parametrize("kind", list(fileformat.KINDS))
def test_converted_file_equals_quantize_and_save_and_loads(tiny_model, source, tmp_path, kind, detectable):
    """INT8 layers bit-identical to Quantize Model's; everything else as in the source file."""
    policy = build_policy(None, rules="out.*: keep")
    config = config_for_mode("dynamic")
    out = str(tmp_path / f"conv_{kind}.safetensors")
    result = convert(source, out, config, policy=policy, kind=kind)
    int8 = {p.name for p in result.layers if p.output == "int8"}
    assert int8 and all(p.kind == "linear" for p in result.layers if p.name in int8) == (kind == "portable")
    quantized, _ = bridge.quantize_model(tiny_model, config, policy=policy)
    ref_layers = bridge.quantized_layers(quantized)
    with safe_open(out, "pt") as a, safe_open(source, "pt") as src:
        for k in a.keys():
            layer, _, suffix = k.rpartition(".")
            if layer in int8 and suffix in ("weight", "weight_scale"):
                assert torch.equal(a.get_tensor(k), getattr(ref_layers[layer], suffix)), k
            elif not k.endswith(".comfy_quant"):
                assert torch.equal(a.get_tensor(k), src.get_tensor(k)), k
        table = json.loads(a.metadata()["_quantization_metadata"])["layers"]
    assert any(s["format"] == fileformat.HOST_REFUSAL for s in table.values()) == (kind == "octet")
    loaded = model_files.load_model(out)
    assert set(bridge.quantized_layers(loaded)) == int8
    card = open(result.card).read()
    assert "source sha256" in card and f"file kind | {kind}" in card
    assert any(p.config is None and p.name.startswith("out.") for p in result.layers)


def test_command_line_runs_from_the_repo_root_and_refuses_clearly(source, tmp_path):
    out = str(tmp_path / "cli.safetensors")
    run = subprocess.run([sys.executable, "-m", "scripts.convert", source, out, "--mode", "weight_only",
                          "--kind", "portable", "--quiet"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert os.path.exists(out) and os.path.exists(out[:-len(".safetensors")] + ".md")
    again = subprocess.run([sys.executable, "-m", "scripts.convert", source, out, "--quiet"], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "already exists" in again.stderr
    static = subprocess.run([sys.executable, "-m", "scripts.convert", source, str(tmp_path / "s.safetensors"),
                             "--mode", "static", "--observer", "minmax", "--no-smoothquant", "--quiet"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert static.returncode == 2 and "--calibration" in static.stderr


def test_stream_writer_refuses_off_plan_tensors_and_leaves_nothing(tmp_path):
    path = str(tmp_path / "w.safetensors")
    plan = {"a": (torch.bfloat16, (3, 5)), "b": (torch.int8, (4,))}
    with pytest.raises(ValueError, match="header says"):
        with StreamWriter(path, plan, {"x": "1"}) as w:
            w.write("a", torch.zeros(3, 5, dtype=torch.bfloat16))
            w.write("b", torch.zeros(5, dtype=torch.int8))
    assert os.listdir(tmp_path) == []
    a = torch.randn(3, 5).to(torch.bfloat16)
    with StreamWriter(path, plan, {"x": "1"}) as w:
        w.write("a", a)
        w.write("b", torch.arange(4, dtype=torch.int8))
    with safe_open(path, "pt") as f:
        assert torch.equal(f.get_tensor("a"), a) and f.metadata() == {"x": "1"}


def test_converting_a_quantized_file_is_refused(source, tmp_path):
    out = str(tmp_path / "o.safetensors")
    convert(source, out, config_for_mode("dynamic"))
    with pytest.raises(OctetError, match="already quantized"):
        convert(out, str(tmp_path / "again.safetensors"), config_for_mode("dynamic"))
