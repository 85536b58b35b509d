"""Load the pack the way ComfyUI does (a package named after its folder) and find the host.

The repository root is itself the package (ComfyUI imports custom_nodes/<dir>/__init__.py), so
tests import it as ``comfyui_octet`` without putting the root on sys.path, where our ``nodes/``
would shadow ComfyUI's own ``nodes`` module.
"""
import hashlib
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


# One seed per run for every random draw in the tests: OCTET_TEST_SEED=<int> reproduces a run, and
# the default is fixed so CI is deterministic. Each test's generator is derived from the run seed and
# the test's id, so a test draws the same inputs whether it runs alone, in a subset or in the suite.
DEFAULT_SEED = 20261201
SEED_ENV = "OCTET_TEST_SEED"


def run_seed() -> int:
    value = os.environ.get(SEED_ENV, "")
    try:
        return int(value) if value.strip() else DEFAULT_SEED
    except ValueError:
        raise pytest.UsageError(f"{SEED_ENV}={value!r} is not an integer") from None


def seed_for(nodeid: str) -> int:
    digest = hashlib.blake2b(f"{run_seed()}:{nodeid}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def pytest_report_header(config):
    return f"octet test seed: {SEED_ENV}={run_seed()}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and "rng" in getattr(item, "fixturenames", ()):
        report.sections.append(("octet test seed", f"{SEED_ENV}={run_seed()} (this test's generator seed: "
                                                   f"{seed_for(item.nodeid)}); rerun with it to reproduce"))


@pytest.fixture
def rng(request):
    """A generator seeded from the run seed and this test's id (see ``run_seed``)."""
    g = torch.Generator()
    g.manual_seed(seed_for(request.node.nodeid))
    return g


def _switches() -> dict:
    return {k: v for k, v in os.environ.items() if k.startswith("OCTET_") or k == "TRITON_INTERPRET"}


@pytest.fixture(autouse=True)
def _switches_restored():
    """Every test leaves Octet's switches (environment variables read per call) as it found them: a switch left
    set changes what the tests after it run (OCTET_FLOAT_FUSIONS=1 under the interpreter makes a UNet test take
    minutes). Set them with monkeypatch.setenv, which restores them."""
    before = _switches()
    yield
    after = _switches()
    changed = sorted(set(after.items()) ^ set(before.items()))
    assert after == before, f"this test changed switches and left them: {changed}"
