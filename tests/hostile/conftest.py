"""Hostile-input tests run against the real ComfyUI (found by nodes/host.py), like tests/nodes."""
import os
import sys

import pytest

from comfyui_octet.nodes import host

host.ensure_comfy(cpu=True)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import make_files  # noqa: E402


@pytest.fixture(scope="session")
def valid_files(tmp_path_factory):
    return make_files.build_valid_files(str(tmp_path_factory.mktemp("hostile_valid")))
