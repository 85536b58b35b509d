"""The teacher: the float model's own denoiser calls, recorded while something samples it.

No training data is needed: whatever drives the float model (the host's sampler, a test loop) is
the trajectory, and each call's inputs and output are what the student must reproduce.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch
import torch.nn as nn


def map_tensors(obj, fn):
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_tensors(v, fn) for v in obj)
    return obj  # anything else (patch lists, callables) is passed through by reference


@dataclass
class TeacherCall:
    """One denoiser call of the float model: its inputs as given and the output it produced."""
    args: tuple
    kwargs: dict
    target: torch.Tensor
    sigma: Optional[float] = None


@dataclass
class Teacher:
    calls: list[TeacherCall] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        total = 0

        def count(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t
        for c in self.calls:
            map_tensors((c.args, c.kwargs, c.target), count)
        return total


@contextlib.contextmanager
def record_teacher(model: nn.Module, storage: torch.device = torch.device("cpu"),
                   sigma_of: Optional[Callable[[tuple, dict], object]] = None) -> Iterator[Teacher]:
    """Record every forward call of ``model`` (inputs and output, copied to ``storage``).

    Whatever drives the model - a host sampler, a test loop - is the trajectory; the hook is
    removed on exit, also after an error. ``sigma_of(args, kwargs)`` tells the noise level of a
    call, which static layers with timestep groups need to pick their scale while training.
    """
    teacher = Teacher()

    def keep(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(storage, copy=True)

    def hook(module, args, kwargs, output):
        sigma = sigma_of(args, kwargs) if sigma_of is not None else None
        if isinstance(sigma, torch.Tensor):
            sigma = float(sigma.detach().float().max())
        teacher.calls.append(TeacherCall(map_tensors(args, keep), map_tensors(kwargs, keep), keep(output), sigma))

    handle = model.register_forward_hook(hook, with_kwargs=True)
    try:
        yield teacher
    finally:
        handle.remove()
