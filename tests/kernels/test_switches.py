"""kernels/switches.py reads the dict behind os.environ: every write through os.environ (monkeypatch.setenv,
a bench setting a switch in-process) shows at the next read, as with os.environ.get, and a Python without that
dict reads os.environ."""
import os

import pytest

from comfyui_octet.kernels import switches
from comfyui_octet.kernels.backends import triton_support


@pytest.mark.parametrize("fallback", [False, True])
def test_reads_follow_every_write_through_os_environ(monkeypatch, fallback):
    if fallback:
        monkeypatch.setattr(switches, "_FAST", False)
    name = "OCTET_TEST_SWITCH_A"
    monkeypatch.delenv(name, raising=False)
    assert switches.read(name) is None and switches.read(name, "d") == "d"
    assert switches.on(name) and not switches.is_one(name)
    for value, on, one in (("0", False, False), ("1", True, True), ("yes", True, False), ("", True, False),
                           ("00", True, False), ("é1", True, False)):
        monkeypatch.setenv(name, value)
        assert switches.read(name) == os.environ.get(name) == value
        assert (switches.on(name), switches.is_one(name)) == (on, one), value
    os.environ[name] = "0"
    assert not switches.on(name)
    del os.environ[name]
    assert switches.on(name) and switches.read(name) is None


def test_triton_interpreting_follows_the_environment(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_support.interpreting()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not triton_support.interpreting()
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not triton_support.interpreting()
