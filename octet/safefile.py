"""Safe safetensors writes and safe output names: a save never leaves anything behind.

* The file is written to ``.octet-partial-<pid>-<random>.tmp`` beside the target and renamed into
  place (atomic on one filesystem), so a failure never clobbers the old file.
* The partial file is removed on every exit path Python sees (exceptions, KeyboardInterrupt,
  SIGTERM while saving on the main thread, turned into an exception for that time, and interpreter
  exit while another thread is saving, through atexit). What no
  process can clean (SIGKILL, power loss) carries the writer's pid in its name: ``sweep`` removes
  partial files of dead processes, and runs before every save and when the nodes load.
* We write the safetensors format ourselves, in chunks from Python: an interrupt arrives between
  two chunks as an ordinary exception (safetensors' Rust writer could not unwind it: ComfyUI died
  with "FATAL: exception not rethrown"), and no safetensors ``.tmpXXXXXX`` is ever created.
* The file is created with mode 0o666 & ~umask, like any other file the user writes (mkstemp's
  0600 hid models from other users of a shared models folder).
* ``output_path`` normalises user-typed names and refuses empty, hidden, absolute, traversing,
  NUL-holding, whitespace-only or overlong ones with a message saying what to type.
"""
from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import secrets
import signal
import struct
import threading
from typing import Iterator

import torch

from .api import OctetError

PARTIAL_PREFIX = ".octet-partial-"
_PARTIAL = re.compile(r"^\.octet-partial-(\d+)-[0-9a-f]+\.tmp$")
CHUNK = 16 << 20          # bytes per write: the longest an interrupt waits
MAX_NAME = 200            # characters of one path component the user types
_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}
for _name, _code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2")):
    if hasattr(torch, _name):
        _DTYPES[getattr(torch, _name)] = _code


# -- names -----------------------------------------------------------------------------------------
def output_path(root: str, filename: str, ext: str = ".safetensors", what: str = "file") -> str:
    """The absolute path for a user-typed ``filename`` (relative, '/'-separated, extension optional)
    under ``root``; OctetError with the fix for anything that is not a plain visible name."""
    if not isinstance(filename, str):
        raise OctetError(f"The {what} name must be text, got {type(filename).__name__}.")
    name = filename.strip()
    if name.lower().endswith(ext):
        name = name[: -len(ext)].rstrip()
    example = f"use a name like 'octet/my_{what}'"
    if "\x00" in name:
        raise OctetError(f"The {what} name {filename!r} contains a NUL character; {example}.")
    if "\\" in name or os.path.isabs(name) or re.match(r"^[A-Za-z]:", name):
        raise OctetError(f"The {what} name {filename!r} is an absolute path or uses '\\'; {example} (relative to "
                         f"the models folder, '/' between folders).")
    parts = name.split("/")
    if not name or any(not p.strip() for p in parts):
        raise OctetError(f"The {what} name {filename!r} is empty (or has an empty folder part); {example}.")
    for p in parts:
        if p != p.strip():
            raise OctetError(f"The {what} name {filename!r} has a part that starts or ends with spaces; {example}.")
        if p in (".", "..") or p.startswith("."):
            raise OctetError(f"The {what} name {filename!r} has a hidden or relative part ({p!r}); such files are "
                             f"never listed by ComfyUI. {example[0].upper() + example[1:]}.")
        if len(p) + len(ext) > MAX_NAME:
            raise OctetError(f"The {what} name {filename!r} has a part of {len(p)} characters; keep each part under "
                             f"{MAX_NAME - len(ext)} characters.")
        if any(ord(c) < 32 for c in p):
            raise OctetError(f"The {what} name {filename!r} contains control characters; {example}.")
    root = os.path.abspath(root)
    path = os.path.abspath(os.path.join(root, *parts) + ext)
    if os.path.commonpath([path, root]) != root:
        raise OctetError(f"The {what} name {filename!r} leaves the models folder; {example}.")
    return path


# -- partial files -----------------------------------------------------------------------------------
def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    except OSError:
        return False
    return True


def sweep(folder: str) -> list[str]:
    """Remove partial files that a dead process (SIGKILL, power loss) left in ``folder``; returns them."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        m = _PARTIAL.match(name)
        if m and not _alive(int(m.group(1))):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(folder, name))
                removed.append(name)
    return removed


def sweep_tree(root: str) -> list[str]:
    """``sweep`` over ``root`` and its sub-folders (saves go to e.g. models/diffusion_models/octet/)."""
    removed = []
    for folder, _dirs, _files in os.walk(root):
        removed += sweep(folder)
    return removed


# Partial files being written now. When the interpreter exits while another thread is still saving
# (Ctrl+C in ComfyUI ends the main thread; the executor thread is a daemon and never unwinds), atexit
# runs before daemon threads stop, and removes them.
_ACTIVE: set[str] = set()


@atexit.register
def _remove_active() -> None:
    for path in list(_ACTIVE):
        _remove(path)


class Terminated(BaseException):
    """SIGTERM arrived while a save was writing (raised on the main thread, after the file is removed
    the process exits with the signal's default status)."""


@contextlib.contextmanager
def _sigterm_as_exception() -> Iterator[None]:
    """While saving on the main thread with SIGTERM at its default action (terminate, no cleanup), turn it
    into an exception so the partial file is removed first. A handler someone else installed is left to
    do its job (an exception it raises cleans up like any other); other threads cannot set handlers
    (ComfyUI's executor): ``sweep`` cleans after them."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def handler(signum, frame):
        raise Terminated(signum)
    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


# -- writing -------------------------------------------------------------------------------------------
def _header(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[bytes, list[str]]:
    head, offset, order = {}, 0, sorted(tensors)
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise TypeError("safetensors metadata must map str to str")
        head["__metadata__"] = dict(metadata)
    for key in order:
        t = tensors[key]
        if t.dtype not in _DTYPES:
            raise TypeError(f"'{key}': dtype {t.dtype} cannot be stored in safetensors")
        size = t.numel() * t.element_size()
        head[key] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(head, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the data start to 8 bytes
    return struct.pack("<Q", len(raw)) + raw, order


def write_chunks(f, data: memoryview) -> None:
    """Write ``data`` in CHUNK pieces (an interrupt lands between two of them)."""
    for start in range(0, len(data), CHUNK):
        f.write(data[start:start + CHUNK])


def write_safetensors(tensors: dict[str, torch.Tensor], f, metadata: dict[str, str]) -> None:
    head, order = _header(tensors, metadata)
    f.write(head)
    for key in order:
        t = tensors[key].detach().to("cpu").contiguous()
        if t.numel():
            write_chunks(f, memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B"))


def save_atomic(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str]) -> None:
    """Write to a partial file beside ``path`` and rename it into place; nothing is left on failure."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    sweep(folder)
    tmp = os.path.join(folder, f"{PARTIAL_PREFIX}{os.getpid()}-{secrets.token_hex(6)}.tmp")
    _ACTIVE.add(tmp)
    try:
        with _sigterm_as_exception():
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
            with os.fdopen(fd, "wb") as f:
                write_safetensors(tensors, f, metadata)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
    except Terminated:
        _remove(tmp)
        signal.raise_signal(signal.SIGTERM)  # default action again: die as the sender meant, file gone
        raise
    except BaseException:
        _remove(tmp)
        raise
    finally:
        _ACTIVE.discard(tmp)


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)
