"""A cheap, stable fingerprint of a model's float weights.

Calibrations and quantized checkpoints record which model they were made from. Hashing every
byte of a 12B model takes minutes, so we hash names, shapes, dtypes and a fixed strided sample
of each tensor's values: any retrained or differently-merged model changes it, re-running does not.
"""
from __future__ import annotations

import hashlib

import torch

SAMPLES_PER_TENSOR = 1024


def _sample(t: torch.Tensor) -> bytes:
    flat = t.detach().reshape(-1)
    if flat.numel() > SAMPLES_PER_TENSOR:
        step = flat.numel() // SAMPLES_PER_TENSOR
        flat = flat[::step][:SAMPLES_PER_TENSOR]
    return flat.to("cpu", torch.float32).numpy().tobytes()


def state_fingerprint(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name]
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
        if t.device.type != "meta":
            h.update(_sample(t))
    return h.hexdigest()[:32]


def module_fingerprint(module: torch.nn.Module) -> str:
    return state_fingerprint(dict(module.state_dict()))
