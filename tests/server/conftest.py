"""Fixtures for tests against the real ComfyUI server (a subprocess with Octet in custom_nodes)."""
import os

import pytest

from octet_harness import ROOT, ComfyServer

ARTIFACTS = os.environ.get("OCTET_TEST_ARTIFACTS", os.path.join(ROOT, "out", "test_artifacts"))


@pytest.fixture(scope="session")
def comfy_server():
    """One server for the session: started on a free port, stopped and its folder removed at the end."""
    server = ComfyServer()
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


@pytest.fixture(scope="session")
def artifacts():
    os.makedirs(ARTIFACTS, exist_ok=True)
    return ARTIFACTS
