"""Replay a Triton launch without Triton's per-call dispatch: the plan's last step.

Measured on an H200 (bench/overhead.py, torch 2.11, Triton 3.6): a layer whose plan was already
made still spent 75-90 us of host time per autotuned launch and ~55 us per plain one, most of it
in Triton's Python dispatch (the autotuner's key and config lookup and pre-hook, the JIT's argument
binding, specialisation key and cache lookup). For a fixed call signature none of that changes
between calls, so the first launch goes through Triton as usual and this module keeps what it
resolved: the compiled kernel, the chosen config's meta-parameters and pre-hook, and the grid.
Later launches with the same signature call the compiled kernel's launcher directly.

The signature key holds every non-tensor argument (sizes, strides, flags), the dtype of every
tensor and whether every pointer is 16-byte aligned (Triton specialises on that), so any change
that could select another compiled kernel makes a new entry. Safety: replay is checked once per
kernel per process against Triton's own launch (same inputs, equal outputs) before it is trusted,
never while a CUDA graph is being captured; a mismatch or an error turns replay off for that kernel
(logged once) and Triton's dispatch is used from then on. ``OCTET_TRITON_REPLAY=0`` turns it off.
"""
from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger("octet.kernels")

_replays: dict = {}
_trusted: dict[str, bool] = {}   # kernel name -> replay verified (True) or refused (False)


def enabled() -> bool:
    return os.environ.get("OCTET_TRITON_REPLAY", "1") != "0"


def _name(kernel) -> str:
    fn = kernel
    while hasattr(fn, "fn"):
        fn = fn.fn
    return getattr(fn, "__name__", repr(fn))


def _jit(kernel):
    fn = kernel
    while not hasattr(fn, "arg_names") or hasattr(fn, "configs") or hasattr(fn, "values"):
        fn = fn.fn
    return fn


def _signature(name: str, args: tuple, kwargs: dict) -> tuple:
    key = [name]
    for a in args:
        if isinstance(a, torch.Tensor):
            key.append((a.dtype, a.data_ptr() % 16 == 0, a.device.index))
        elif hasattr(a, "base") and isinstance(getattr(a, "base"), torch.Tensor):   # TensorDescriptor
            key.append(("desc", a.base.dtype, tuple(a.shape), tuple(a.strides)))
        else:
            key.append(a)
    key.extend(sorted(kwargs.items()))
    return tuple(key)


class _Replay:
    __slots__ = ("compiled", "names", "fixed", "grid", "pre_hook", "positional")

    def __init__(self, kernel, compiled, grid, args, kwargs):
        jit = _jit(kernel)
        self.compiled = compiled
        self.names = list(jit.arg_names)
        config = getattr(kernel, "best_config", None)
        fixed = dict(kwargs)
        if config is not None:
            fixed.update(config.kwargs)
        self.fixed = fixed
        self.positional = self.names[:len(args)]
        self.pre_hook = getattr(config, "pre_hook", None) if config is not None else None
        full = {**dict(zip(self.positional, args)), **fixed}
        g = grid(full) if callable(grid) else grid
        self.grid = (g[0], g[1] if len(g) > 1 else 1, g[2] if len(g) > 2 else 1)

    def __call__(self, args):
        values = dict(zip(self.positional, args))
        values.update(self.fixed)
        if self.pre_hook is not None:
            self.pre_hook(values)
        c = self.compiled
        stream = torch.cuda.current_stream().cuda_stream
        c.run(self.grid[0], self.grid[1], self.grid[2], stream, c.function, c.packed_metadata, None, None, None,
              *[values[n] for n in self.names])


def launch(kernel, grid, args: tuple, kwargs: dict, outputs: tuple = ()):
    """``kernel[grid](*args, **kwargs)``, replayed directly once this signature has been launched.

    ``outputs``: the tensors the kernel writes, used once per kernel to verify replay against
    Triton's own launch."""
    first = next((a for a in args if isinstance(a, torch.Tensor)), None)
    if not enabled() or first is None or not first.is_cuda:
        return kernel[grid](*args, **kwargs)
    name = _name(kernel)
    if _trusted.get(name) is False:
        return kernel[grid](*args, **kwargs)
    key = _signature(name, args, kwargs)
    replay = _replays.get(key)
    if replay is not None and _trusted.get(name):
        replay(args)
        return None
    capturing = torch.cuda.is_current_stream_capturing()
    compiled = kernel[grid](*args, **kwargs)
    if replay is None and compiled is not None and hasattr(compiled, "run"):
        try:
            _replays[key] = replay = _Replay(kernel, compiled, grid, args, kwargs)
        except Exception as e:  # an internal Triton change: keep Triton's dispatch
            _refuse(name, f"{type(e).__name__}: {e}")
            return None
    if replay is not None and name not in _trusted and not capturing and outputs:
        _verify(name, replay, args, outputs)
    return None


def _verify(name: str, replay: _Replay, args: tuple, outputs: tuple) -> None:
    expected = [o.clone() for o in outputs]
    try:
        for o in outputs:
            o.zero_()
        replay(args)
        same = all(torch.equal(o, e) for o, e in zip(outputs, expected))
    except Exception as e:
        for o, e_ in zip(outputs, expected):
            o.copy_(e_)
        _refuse(name, f"{type(e).__name__}: {e}")
        return
    if not same:
        for o, e_ in zip(outputs, expected):
            o.copy_(e_)
        _refuse(name, "replayed launch gave other numbers than Triton's own")
        return
    _trusted[name] = True
    log.info("Octet: Triton launches of %s are replayed directly after the first call (verified once).", name)


def _refuse(name: str, reason: str) -> None:
    _trusted[name] = False
    log.warning("Octet: replaying Triton launches of %s is off (%s); using Triton's dispatch.", name, reason)
