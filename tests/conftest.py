"""Load the pack the way ComfyUI does (a package named after its folder) and find the host.

The repository root is itself the package (ComfyUI imports custom_nodes/<dir>/__init__.py), so
tests import it as ``comfyui_octet`` without putting the root on sys.path, where our ``nodes/``
would shadow ComfyUI's own ``nodes`` module.
"""
import importlib.util
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "comfyui_octet"


def _load_pack():
    if PACKAGE in sys.modules:
        return sys.modules[PACKAGE]
    spec = importlib.util.spec_from_file_location(PACKAGE, os.path.join(ROOT, "__init__.py"),
                                                  submodule_search_locations=[ROOT])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = module
    spec.loader.exec_module(module)
    return module


_load_pack()

# One thread: the models under test are tiny, and on a loaded 2-core machine torch's default
# thread pool oversubscribes the cores (measured 15x slower); results do not depend on it.
torch.set_num_threads(int(os.environ.get("OCTET_TEST_THREADS", "1")))


@pytest.fixture
def rng():
    """A fresh generator per test, seeded from the OS: inputs differ on every run."""
    g = torch.Generator()
    g.seed()
    return g
