"""Issue 17 through the real server (POST /prompt, then /history): forged checkpoints, bad save names,
NaN widgets and a 2 MB policy stop at their node with Octet's message; nothing is left behind and the
server keeps serving."""
import math
import os
import sys

import pytest

from comfyui_octet.nodes import host
from octet_harness import history_error

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "hostile"))

FORGED = ("blocks_8000", "bias_missing", "bitflip_data_end", "architecture_module", "timestep_groups_strings",
          "static_without_octet_record")


@pytest.fixture(scope="module")
def forged_files(comfy_server, tmp_path_factory):
    """Damaged variants of a valid Octet checkpoint, in the server's models/diffusion_models/hostile/."""
    host.ensure_comfy(cpu=True)
    import make_files
    valid = make_files.build_valid_files(str(tmp_path_factory.mktemp("valid")))
    folder = comfy_server.path("models", "diffusion_models", "hostile")
    os.makedirs(folder, exist_ok=True)
    cases = {c.name: c for c in make_files.checkpoint_cases()}
    for name in FORGED:
        make_files.write_case(cases[name], valid["checkpoint"], os.path.join(folder, f"{name}.safetensors"))
    return folder


def _base():
    return {
        "1": {"class_type": "OctetReferenceModel", "inputs": {"model": "unet", "variant": "plain", "seed": 20261126}},
        "2": {"class_type": "OctetReferenceConditioning",
              "inputs": {"model": "unet", "class_name": "bag", "batch": 1, "seed": 0}},
        "3": {"class_type": "OctetReferenceConditioning",
              "inputs": {"model": "unet", "class_name": "unconditional", "batch": 1, "seed": 0}},
        "4": {"class_type": "OctetReferenceLatent", "inputs": {"model": "unet", "batch": 1}},
        "5": {"class_type": "OctetQuantizeModel", "inputs": {"mode": "dynamic", "quantize_linear": True,
                                                             "quantize_conv": True, "backend": "auto",
                                                             "model": ["1", 0]}},
    }


def _sampler(model_link, seed, **widgets):
    inputs = {"seed": seed, "steps": 2, "cfg": 3.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
              "float_first_steps": 0, "float_last_steps": 0, "model": model_link, "positive": ["2", 0],
              "negative": ["3", 0], "latent_image": ["4", 0]}
    inputs.update(widgets)
    return {"class_type": "OctetInt8Sampler", "inputs": inputs}


def _post_with_nan(server, prompt) -> dict:
    """POST /prompt with NaN in the JSON, as a hand-written client can (requests refuses to encode NaN)."""
    import json
    import requests
    r = requests.post(server.url + "/prompt", data=json.dumps({"prompt": prompt}, allow_nan=True),
                      headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code == 200, r.text[:2000]
    return server.wait(r.json()["prompt_id"], timeout=180)


def _fails_at(server, prompt, node_id, *fragments, nan=False):
    entry = _post_with_nan(server, prompt) if nan else server.run(prompt, timeout=180)
    assert entry["status"]["status_str"] == "error", entry["status"]
    err = history_error(entry)
    assert err["node_id"] == node_id and err["exception_type"].endswith("OctetError"), err
    for fragment in fragments:
        assert fragment in err["exception_message"], err
    assert server.alive()
    return err


@pytest.mark.parametrize("name", FORGED)
def test_forged_checkpoint_stops_at_load_quantized(comfy_server, forged_files, name):
    prompt = _base()
    prompt["9"] = {"class_type": "OctetLoadQuantized", "inputs": {"ckpt_name": f"hostile/{name}.safetensors",
                                                                  "backend": "auto"}}
    prompt["6"] = _sampler(["9", 0], seed=17)
    prompt["7"] = {"class_type": "PreviewAny", "inputs": {"preview": "", "source": ["6", 1]}}
    _fails_at(comfy_server, prompt, "9", f"{name}.safetensors")
    assert sorted(os.listdir(forged_files)) == sorted(f"{n}.safetensors" for n in FORGED)


@pytest.mark.parametrize("filename", ["", "..", "x/", "   ", "a\x00b", "y" * 300])
def test_bad_save_name_stops_at_save_quantized_and_writes_nothing(comfy_server, filename):
    models = comfy_server.path("models", "diffusion_models")
    before = {os.path.join(d, f) for d, _, fs in os.walk(models) for f in fs}
    prompt = _base()
    prompt["6"] = {"class_type": "OctetSaveQuantized", "inputs": {"model": ["5", 0], "filename": filename,
                                                                  "overwrite": False}}
    _fails_at(comfy_server, prompt, "6", "name")
    after = {os.path.join(d, f) for d, _, fs in os.walk(models) for f in fs}
    assert after == before


@pytest.mark.parametrize("widget", ["cfg", "denoise"])
def test_nan_widget_stops_at_int8_sampler(comfy_server, widget):
    prompt = _base()
    prompt["6"] = _sampler(["5", 0], seed=23, **{widget: math.nan})
    prompt["7"] = {"class_type": "PreviewAny", "inputs": {"preview": "", "source": ["6", 1]}}
    _fails_at(comfy_server, prompt, "6", f"'{widget}' is nan", nan=True)


def test_two_megabyte_policy_stops_at_the_policy_node(comfy_server):
    prompt = _base()
    prompt["8"] = {"class_type": "OctetMixedPrecisionPolicy",
                   "inputs": {"preset": "none", "conservative": False, "default_action": "default",
                              "rules": "input_blocks.1.1.proj_in: keep\n" * 70000, "overrides": ""}}
    prompt["5"]["inputs"]["policy"] = ["8", 0]
    prompt["6"] = {"class_type": "PreviewAny", "inputs": {"preview": "", "source": ["5", 1]}}
    _fails_at(comfy_server, prompt, "8", "limit is")
