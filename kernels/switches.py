"""Octet's switches: environment variables read on hot paths (per layer call, per launch).

Why not ``os.environ.get``: it encodes the key and decodes the value in Python (~0.7 us per read on this
repository's CPU), and an eager SDXL step reads switches about a thousand times (each fused GroupNorm / GEGLU,
deferred forward and launch asks whether it is on, and whether Triton is interpreting). ``read`` looks the key up
in the dict behind ``os.environ`` (what ``os.environ.get`` reads; every write through ``os.environ``, pytest's
``monkeypatch.setenv`` included, updates it) in ~0.03 us. Where that dict is not there (another Python), it reads
``os.environ``. Read per call, as before: tests and benches flip switches within one process.
"""
from __future__ import annotations

import os
from typing import Optional

_DATA = getattr(os.environ, "_data", None)
_ENCODE = getattr(os.environ, "encodekey", None)
_DECODE = getattr(os.environ, "decodevalue", None)
# Where CPython's dict and codecs behind os.environ are there (every CPython); else os.environ is read.
_FAST = _DATA is not None and _ENCODE is not None and _DECODE is not None
_KEYS: dict[str, object] = {}
_OFF = frozenset({b"0", "0"})
_ONE = frozenset({b"1", "1"})


def _raw(name: str):
    """The stored value of ``name`` (bytes on POSIX, str on Windows), or None if unset."""
    key = _KEYS.get(name)
    if key is None:
        key = _KEYS[name] = _ENCODE(name)
    return _DATA.get(key)


def read(name: str, default: Optional[str] = None) -> Optional[str]:
    """``os.environ.get(name, default)``."""
    if not _FAST:
        return os.environ.get(name, default)
    raw = _raw(name)
    return default if raw is None else _DECODE(raw)


def on(name: str) -> bool:
    """Whether switch ``name`` is on: unset, or set to anything but "0"."""
    if not _FAST:
        return os.environ.get(name, "1") != "0"
    return _raw(name) not in _OFF


def is_one(name: str) -> bool:
    """Whether ``name`` is set to exactly "1" (TRITON_INTERPRET's convention)."""
    if not _FAST:
        return os.environ.get(name, "0") == "1"
    return _raw(name) in _ONE
