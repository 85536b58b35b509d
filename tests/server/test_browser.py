"""A real browser on the real frontend: headless Chromium (the system one) loads example workflow (a),
runs it with the Run button, and waits for the images in the Save Image node; a broken workflow shows
Octet's message. Screenshots go to out/test_artifacts/ (OCTET_TEST_ARTIFACTS)."""
import os

import pytest

from octet_harness import API_WORKFLOWS, WORKFLOWS, Browser, chromium_available, load_json

A = "octet_calibrate_quantize_sample_save"
B = "octet_load_quantized_sample"

reason = chromium_available()
pytestmark = pytest.mark.skipif(reason is not None, reason=f"no browser: {reason}")


@pytest.fixture(scope="module")
def browser(comfy_server):
    comfy_server.free()  # fresh execution cache: the UI run below really executes every node
    with Browser(comfy_server) as b:
        yield b


def load(browser, name, workflow=None):
    browser.load_workflow(workflow or load_json(os.path.join(WORKFLOWS, name + ".json")), name)
    unknown = browser.js("() => window.app.graph._nodes.filter(n => !window.LiteGraph.registered_node_types[n.type])"
                         ".map(n => n.type)")
    assert not unknown, f"the frontend does not know {unknown}"


def declared(prompt: dict, object_info: dict) -> dict:
    """``prompt`` with only the inputs each node's /object_info declares (required, optional)."""
    out = {}
    for key, node in prompt.items():
        spec = object_info[node["class_type"]]["input"]
        names = set(spec.get("required", {})) | set(spec.get("optional", {}))
        out[key] = dict(node, inputs={k: v for k, v in node["inputs"].items() if k in names})
    return out


def test_example_a_runs_in_the_browser(browser, artifacts):
    load(browser, A)
    # The frontend turns the UI file into exactly the API prompt the server tests queue, up to inputs the
    # server does not declare: frontend-only widgets, which differ between frontends (1.32's PreviewAny
    # sends a "preview" text, 1.47's does not) and which the server ignores.
    info = browser.server.get("/object_info")
    assert declared(browser.to_prompt(), info) == declared(load_json(os.path.join(API_WORKFLOWS, A + ".json")), info)
    srcs = browser.run_and_wait_for_images()
    assert len(srcs) == 4 and all("/view?" in s and "example_a" in s for s in srcs), srcs
    browser.screenshot(os.path.join(artifacts, "browser_example_a.png"))


def test_node_error_shows_octets_message_in_the_ui(browser, artifacts):
    """INT8 Sampler fed the float MODEL: the UI reports Octet's explanation and marks the node."""
    load(browser, B)
    sampler = browser.js("""() => { const g = window.app.graph;
        const ref = g._nodes.find(n => n.type === 'OctetReferenceModel');
        const s = g._nodes.find(n => n.type === 'OctetInt8Sampler');
        ref.connect(0, s, s.findInputSlot('model'));
        return s.id; }""")
    browser.click_run()
    message = browser.page.get_by_text("is not quantized", exact=False).first
    # Frontend 1.32 (ComfyUI 0.3.75) opens a dialog with the message; 1.47 (0.29) first shows an "errors found"
    # toast whose "View details" opens the panel with it.
    details = browser.page.get_by_role("button", name="View details").first
    message.or_(details).first.wait_for(state="visible", timeout=120_000)
    if not message.is_visible():
        details.click()
    message.wait_for(state="visible", timeout=30_000)
    assert "Quantize Model" in message.inner_text()
    errors = browser.js("() => window.app.lastExecutionError && window.app.lastExecutionError.node_id")
    assert str(errors) == str(sampler)
    browser.page.wait_for_timeout(800)  # let the dialog finish fading in
    browser.screenshot(os.path.join(artifacts, "browser_node_error.png"))
