"""The real ComfyUI server with Octet in custom_nodes: /object_info, the example workflows through
POST /prompt, the host's answer to malformed prompts, and Octet's error message in /history."""
import copy
import json
import os
import struct

import pytest

from comfyui_octet.nodes import host
from build_workflows import SPECS
from octet_harness import API_WORKFLOWS, PACK_DIR_NAME, WORKFLOWS, history_error, load_json

A = "octet_calibrate_quantize_sample_save"
B = "octet_load_quantized_sample"
C = "octet_evaluate_fp_vs_int8"
CKPT = os.path.join("models", "diffusion_models", "octet", "example_int8.safetensors")
REAL = sorted(name for name, spec in SPECS.items() if spec.get("real_models"))  # test_real_model_workflows.py


def api(name):
    return load_json(os.path.join(API_WORKFLOWS, name + ".json"))


def node_of(prompt, class_type, title=None):
    ids = [k for k, v in prompt.items() if v["class_type"] == class_type and title in (None, v["_meta"]["title"])]
    assert len(ids) == 1, (class_type, title, ids)
    return ids[0]


def saved_images(server, entry, node_id):
    images = entry["outputs"][node_id]["images"]
    paths = [server.path("output", im["subfolder"], im["filename"]) for im in images]
    for p in paths:
        assert os.path.getsize(p) > 0, p
    return paths


def png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", head[16:24])


def text_output(entry, node_id):
    return "".join(entry["outputs"][node_id]["text"])


def assert_success(server, entry):
    err = history_error(entry)
    assert entry["status"]["status_str"] == "success", f"{err}\n{server.log_tail()}"


@pytest.fixture(scope="module")
def octet_schemas():
    """Every node Octet registers, as its own schema says (imports the host in this process)."""
    host.ensure_comfy(cpu=True)
    from comfyui_octet.nodes.extension import NODES
    return {cls.GET_SCHEMA().node_id: cls.GET_SCHEMA() for cls in NODES}


@pytest.fixture(scope="module")
def run_a(comfy_server):
    """Example (a), run once: later tests (the checkpoint loader in (b)) use what it saved."""
    return comfy_server.run(api(A), timeout=400)


def test_object_info_lists_every_octet_node(comfy_server, octet_schemas):
    info = comfy_server.get("/object_info")
    missing = sorted(set(octet_schemas) - set(info))
    assert not missing, f"not served by /object_info: {missing}\n{comfy_server.log_tail()}"
    for node_id, schema in octet_schemas.items():
        served = info[node_id]
        where = f"{node_id} ({served['display_name']})"
        assert PACK_DIR_NAME in served["python_module"], where
        assert served["display_name"] == schema.display_name and served["display_name"] != node_id, where
        assert served["category"].split("/")[0] == "octet", where
        assert served["description"], f"{where}: no description"
        inputs = {**served["input"].get("required", {}), **served["input"].get("optional", {})}
        assert [i.id for i in schema.inputs] == list(inputs), where
        assert served["output"] == [o.get_io_type() for o in schema.outputs], where
        assert served["output_name"] and all(served["output_name"]), where
        no_tip = [n for n, spec in inputs.items() if not (len(spec) > 1 and spec[1].get("tooltip"))]
        assert not no_tip, f"{where}: inputs without a tooltip: {no_tip}"
        for name, spec in inputs.items():  # widgets have a default the UI shows (combos: first option)
            if spec[0] in ("INT", "FLOAT", "BOOLEAN", "STRING"):
                assert "default" in spec[1], f"{where}.{name}: no default"


def test_example_workflows_are_served_as_templates(comfy_server):
    listed = comfy_server.get("/workflow_templates")
    assert sorted(listed.get(PACK_DIR_NAME, [])) == sorted([A, B, C] + REAL)
    for name in (A, B, C):
        served = comfy_server.get(f"/api/workflow_templates/{PACK_DIR_NAME}/{name}.json")
        assert served == load_json(os.path.join(WORKFLOWS, name + ".json"))


def test_example_a_calibrate_quantize_sample_save(comfy_server, run_a):
    entry, prompt = run_a, api(A)
    assert_success(comfy_server, entry)
    images = saved_images(comfy_server, entry, node_of(prompt, "SaveImage"))
    assert len(images) == 4 and all(png_size(p) == (128, 128) for p in images)
    assert all("example_a" in os.path.basename(p) for p in images)
    # The INT8 checkpoint: safetensors with int8 weights and Octet's record of a static quantization.
    path = comfy_server.path(CKPT)
    with open(path, "rb") as f:
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    meta = json.loads(header["__metadata__"]["octet"])
    assert meta["mode"] == "static", meta.get("mode")
    assert any(v["dtype"] == "I8" for k, v in header.items() if k != "__metadata__")
    report = text_output(entry, node_of(prompt, "PreviewAny", "quantize report"))
    timing = text_output(entry, node_of(prompt, "PreviewAny", "sampler timing"))
    assert "static" in report and "int8" in timing and "float" in timing, (report[:500], timing)


STATIC_WIDGETS = ("observer", "percentile", "use_timestep_groups", "smooth_alpha", "smoothquant")


def upstream(prompt, node_id):
    """``node_id`` and every node it reads from."""
    seen, todo = set(), [node_id]
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo += [v[0] for v in prompt[n]["inputs"].values() if isinstance(v, list) and len(v) == 2]
    return {k: prompt[k] for k in seen}


def test_workflow_saved_before_static_settings_moved_still_runs(comfy_server):
    """Example (a) as saved when observer/percentile/... were Calibrate's widgets: the host drops the inputs
    Calibrate no longer declares, and Quantize Model, which lacks them, uses the defaults they had."""
    prompt = api(A)
    calib, quant = node_of(prompt, "OctetCalibrate"), node_of(prompt, "OctetQuantizeModel")
    moved = {k: prompt[quant]["inputs"].pop(k) for k in STATIC_WIDGETS}
    prompt[calib]["inputs"].update(moved, percentile=99.9)
    old = upstream(prompt, node_of(prompt, "PreviewAny", "quantize report"))
    entry = comfy_server.run(old, timeout=300)
    assert_success(comfy_server, entry)
    assert "static" in text_output(entry, node_of(old, "PreviewAny", "quantize report"))


def test_example_b_load_quantized_sample(comfy_server, run_a):
    assert_success(comfy_server, run_a)
    prompt = api(B)
    entry = comfy_server.run(prompt, timeout=300)
    assert_success(comfy_server, entry)
    images = saved_images(comfy_server, entry, node_of(prompt, "SaveImage"))
    assert len(images) == 4 and all(png_size(p) == (128, 128) for p in images)
    assert "int8" in text_output(entry, node_of(prompt, "PreviewAny"))


def test_example_c_evaluate(comfy_server):
    prompt = api(C)
    entry = comfy_server.run(prompt, timeout=300)
    assert_success(comfy_server, entry)
    grid = saved_images(comfy_server, entry, node_of(prompt, "SaveImage", "FP | INT8 | diff"))
    chart = saved_images(comfy_server, entry, node_of(prompt, "SaveImage", "quality / speed / size"))
    assert len(grid) == 1 and len(chart) == 1
    assert png_size(chart[0])[0] > 200
    report = text_output(entry, node_of(prompt, "PreviewAny"))
    assert "PSNR vs FP" in report and "ms/step" in report, report


def test_malformed_prompts_get_the_hosts_error(comfy_server):
    good = api(C)
    sampler = node_of(good, "OctetEvaluate")
    cases = {}
    unknown = copy.deepcopy(good)
    unknown["99"] = {"class_type": "OctetNoSuchNode", "inputs": {}}
    cases["unknown node"] = unknown
    missing = copy.deepcopy(good)
    del missing[sampler]["inputs"]["steps"]
    cases["missing input"] = missing
    bad_link = copy.deepcopy(good)
    bad_link[sampler]["inputs"]["fp_model"] = [node_of(good, "OctetReferenceLatent"), 0]  # LATENT into MODEL
    cases["wrong type"] = bad_link
    out_of_range = copy.deepcopy(good)
    out_of_range[sampler]["inputs"]["steps"] = 0
    cases["out of range"] = out_of_range
    for case, prompt in cases.items():
        r = comfy_server.post_prompt(prompt)
        assert r.status_code == 400, (case, r.status_code, r.text[:500])
        body = r.json()
        assert body["error"]["message"], case
        if case != "unknown node":
            assert body["node_errors"], (case, body)
            errors = [e for n in body["node_errors"].values() for e in n["errors"]]
            assert errors and all(e["message"] for e in errors), (case, body)
    assert comfy_server.post_prompt({}).status_code == 400  # no output node
    assert comfy_server.alive() and comfy_server.get("/system_stats")


def test_node_failure_shows_octets_message(comfy_server):
    """INT8 Sampler given the float MODEL: the run stops at that node with OctetError's explanation."""
    prompt = api(B)
    model = node_of(prompt, "OctetReferenceModel")
    sampler = node_of(prompt, "OctetInt8Sampler")
    prompt[sampler]["inputs"]["model"] = [model, 0]
    prompt[sampler]["inputs"]["seed"] = 12345  # not cached from an earlier run
    entry = comfy_server.run(prompt, timeout=120)
    assert entry["status"]["status_str"] == "error"
    err = history_error(entry)
    assert err["node_id"] == sampler and err["node_type"] == "OctetInt8Sampler", err
    assert err["exception_type"].endswith("OctetError"), err
    assert "is not quantized" in err["exception_message"] and "Quantize Model" in err["exception_message"], err
    assert comfy_server.alive()


def test_unknown_combo_value_fails_at_the_node_with_the_choices(comfy_server):
    """This host does not validate V3 combo values on POST /prompt: the node itself must say what is wrong."""
    prompt = api(C)
    quant = node_of(prompt, "OctetQuantizeModel")
    prompt[quant]["inputs"]["mode"] = "int3"
    r = comfy_server.post_prompt(prompt)
    if r.status_code == 400:  # a host that validates combos answers before running anything
        assert r.json()["node_errors"][quant]
        return
    entry = comfy_server.wait(r.json()["prompt_id"], timeout=120)
    err = history_error(entry)
    assert err and err["node_id"] == quant, entry["status"]
    assert "'int3'" in err["exception_message"] and "dynamic" in err["exception_message"], err
