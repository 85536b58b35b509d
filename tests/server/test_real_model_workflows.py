"""The example workflows for real models (SDXL, Flux) fit the running host: checked against its
/object_info. They cannot run here (they need the user's model files, named in the README and in
build_workflows.REAL_MODEL_FILES), so every node type, input name, link type and widget value is checked
instead, in both the UI file users load and the API prompt the frontend makes of it. `make test` runs this
on ComfyUI 0.3.75 and 0.29.0."""
import os

import pytest

from build_workflows import REAL_MODEL_FILES, SPECS
from octet_harness import API_WORKFLOWS, WORKFLOWS, load_json

REAL = [name for name, spec in SPECS.items() if spec.get("real_models")]
MODEL_FILES = {n for names in REAL_MODEL_FILES.values() for n in names}
FILE_INPUTS = {"ckpt_name", "unet_name", "clip_name1", "clip_name2", "vae_name"}  # list the user's models/ folders
FRONTEND_ONLY = {("PreviewAny", "preview")}  # a widget the frontend adds and the server ignores


@pytest.fixture(scope="module")
def object_info(comfy_server):
    return comfy_server.get("/object_info")


def _inputs(info: dict, node_type: str) -> dict:
    spec = info[node_type]["input"]
    return {**spec.get("required", {}), **spec.get("optional", {})}


def _type_name(spec) -> str:
    """An input's type: a list of options is a COMBO (old style); V3 writes "COMBO" itself."""
    return "COMBO" if isinstance(spec[0], list) else spec[0]


def _combo_options(spec) -> list:
    return spec[0] if isinstance(spec[0], list) else spec[1].get("options", [])


def test_real_model_workflows_are_there_and_listed():
    assert len(REAL) == 3
    for name in REAL:
        assert os.path.exists(os.path.join(WORKFLOWS, name + ".json")), name
        assert os.path.exists(os.path.join(API_WORKFLOWS, name + ".json")), name


@pytest.mark.parametrize("name", REAL)
def test_ui_file_nodes_and_links_fit_object_info(object_info, name):
    wf = load_json(os.path.join(WORKFLOWS, name + ".json"))
    nodes = {n["id"]: n for n in wf["nodes"]}
    for n in nodes.values():
        if n["type"] == "Note":  # a frontend-only node
            continue
        assert n["type"] in object_info, f"{name}: ComfyUI has no node {n['type']}"
        declared = _inputs(object_info, n["type"])
        for slot in n.get("inputs", []):
            if slot.get("link") is None:
                continue
            assert slot["name"] in declared, f"{name}: {n['type']} has no input {slot['name']}"
            assert _type_name(declared[slot["name"]]) in (slot["type"], "*"), (name, n["type"], slot)
    for link_id, src, src_slot, dst, dst_slot, kind in wf["links"]:
        out_type = object_info[nodes[src]["type"]]["output"][src_slot]
        dst_input = nodes[dst]["inputs"][dst_slot]
        want = _type_name(_inputs(object_info, nodes[dst]["type"])[dst_input["name"]])
        where = f"{name}: link {link_id} {nodes[src]['type']}[{src_slot}] ({out_type}) -> " \
                f"{nodes[dst]['type']}.{dst_input['name']} ({want}), typed {kind}"
        assert want in (out_type, "*"), where
        # The frontend types a link into an any-type input ("*") as "*"; otherwise as the output's type.
        assert kind == out_type or (kind == "*" and want == "*"), where


@pytest.mark.parametrize("name", REAL)
def test_api_prompt_inputs_and_values_fit_object_info(object_info, name):
    prompt = load_json(os.path.join(API_WORKFLOWS, name + ".json"))
    for key, node in prompt.items():
        kind = node["class_type"]
        assert kind in object_info, f"{name}: ComfyUI has no node {kind}"
        declared = _inputs(object_info, kind)
        required = object_info[kind]["input"].get("required", {})
        missing = sorted(set(required) - set(node["inputs"]))
        assert not missing, f"{name}: {kind} lacks required inputs {missing}"
        for inp, value in node["inputs"].items():
            if (kind, inp) in FRONTEND_ONLY:
                continue
            assert inp in declared, f"{name}: {kind} has no input {inp}"
            spec = declared[inp]
            if isinstance(value, list):  # a link [node id, output index]
                src = prompt[value[0]]["class_type"]
                got = object_info[src]["output"][value[1]]
                assert _type_name(spec) in (got, "*"), f"{name}: {kind}.{inp} takes {spec[0]}, gets {got}"
                continue
            t = _type_name(spec)
            opts = spec[1] if len(spec) > 1 else {}
            if t == "COMBO":
                if inp in FILE_INPUTS:
                    assert value in MODEL_FILES, f"{name}: {kind}.{inp}={value!r} is not a file the README names"
                else:
                    assert value in _combo_options(spec), f"{name}: {kind}.{inp}={value!r} not in {_combo_options(spec)}"
            elif t in ("INT", "FLOAT"):
                assert isinstance(value, (int, float)) and not isinstance(value, bool), (name, kind, inp, value)
                assert opts.get("min", value) <= value <= opts.get("max", value), (name, kind, inp, value, opts)
            elif t == "BOOLEAN":
                assert isinstance(value, bool), (name, kind, inp, value)
            elif t == "STRING":
                assert isinstance(value, str), (name, kind, inp, value)


def test_readme_names_every_model_file_the_workflows_need():
    with open(os.path.join(os.path.dirname(WORKFLOWS), "README.md"), encoding="utf-8") as f:
        readme = f.read()
    for folder, names in REAL_MODEL_FILES.items():
        for n in names:
            assert f"{folder}/{n}" in readme, f"README does not name models/{folder}/{n}"
