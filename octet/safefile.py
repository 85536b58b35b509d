"""Atomic safetensors writes: a failed save never leaves a half-written file or clobbers the old one."""
from __future__ import annotations

import os
import tempfile

import torch


def save_atomic(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str]) -> None:
    """Write to a temporary file beside ``path`` and rename it into place (atomic on one filesystem)."""
    from safetensors.torch import save_file  # looked up per call: tests replace it to simulate a full disk

    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".octet-", suffix=".safetensors.tmp", dir=folder)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
