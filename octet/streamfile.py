"""Safetensors streamed in and out one tensor at a time, so converting a model never holds it whole.

Reading: ``read_tensor`` opens the file per call. safetensors maps the whole file, and pages read
through a mapping stay resident (counted in RSS) while it is open; a short-lived mapping per
tensor keeps resident memory at one layer.

Writing: a safetensors file is an 8-byte header length, a JSON header with every tensor's dtype,
shape and byte range, then the bytes. ``StreamWriter`` takes the full plan (key -> dtype, shape)
up front, writes the header, then accepts tensors in plan order and checks each against it.
It writes to a temporary file beside the target and renames it into place on ``close``; any
error (or ``abort``) removes the temporary file, so a failure never leaves a partial file.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Iterable

import torch

DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int8: "I8",
          torch.uint8: "U8", torch.float64: "F64", torch.int32: "I32", torch.int64: "I64", torch.bool: "BOOL",
          torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.int16: "I16"}


def tensor_info(path: str) -> tuple[dict[str, tuple[torch.dtype, tuple[int, ...]]], dict[str, str]]:
    """Every tensor's dtype and shape, and the header metadata, without reading any tensor data."""
    from safetensors import safe_open
    names = {v: k for k, v in DTYPES.items()}
    with safe_open(path, framework="pt", device="cpu") as f:
        info = {}
        for k in f.keys():
            s = f.get_slice(k)
            info[k] = (names[s.get_dtype()], tuple(s.get_shape()))
        return info, dict(f.metadata() or {})


def read_tensor(path: str, key: str) -> torch.Tensor:
    from safetensors import safe_open
    with safe_open(path, framework="pt", device="cpu") as f:
        return f.get_tensor(key).clone()  # owns its memory once the mapping closes


class StreamWriter:
    def __init__(self, path: str, plan: dict[str, tuple[torch.dtype, tuple[int, ...]]], metadata: dict[str, str]):
        self.path, self.plan, self.order = path, plan, list(plan)
        header, offset = {}, 0
        for key in self.order:
            dtype, shape = plan[key]
            n = _nbytes(dtype, shape)
            header[key] = {"dtype": DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(prefix=".octet-", suffix=".safetensors.tmp", dir=folder)
        self.f = os.fdopen(fd, "wb")
        self.f.write(len(blob).to_bytes(8, "little") + blob)
        self.next, self.bytes = 0, 8 + len(blob) + offset

    def write(self, key: str, tensor: torch.Tensor) -> None:
        if self.next >= len(self.order) or self.order[self.next] != key:
            expected = self.order[self.next] if self.next < len(self.order) else "nothing"
            raise ValueError(f"tensor '{key}' written out of plan order (expected {expected})")
        dtype, shape = self.plan[key]
        if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"tensor '{key}' is {tensor.dtype} {tuple(tensor.shape)}; the header says "
                             f"{dtype} {tuple(shape)}")
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        if t.numel():
            self.f.write(memoryview(t.view(torch.uint8).numpy()))
        self.next += 1

    def close(self) -> None:
        if self.next != len(self.order):
            self.abort()
            raise ValueError(f"only {self.next} of {len(self.order)} planned tensors were written")
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp, 0o666 & ~umask)  # mkstemp's 0600 would make a file others cannot read
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        if not self.f.closed:
            self.f.close()
        if os.path.exists(self.tmp):
            os.remove(self.tmp)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
        else:
            self.close()


def _nbytes(dtype: torch.dtype, shape: Iterable[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n * torch.empty((), dtype=dtype).element_size()
