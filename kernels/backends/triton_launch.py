"""Launch a Triton kernel through its compiled launcher once Triton's dispatch has run for that key.

Why: on the H200 host (bench/launch_cost.py, 2026-12-02, Triton 3.6) issuing our W8A8 GEMM cost
52.9 us through the autotuner, 30.4 us through ``JITFunction.run`` with the config fixed, and
11.6 us through the compiled kernel's own launcher (TMA descriptor filled included); a planned
INT8 layer (quantize + GEMM) cost 144 us of host time against 15 us for bf16 ``F.linear``.
What the outer layers redo on every call (bind and specialize every argument, hash a cache key,
look up the autotune cache, run config hooks) is fixed by what a plan fixes (dtypes, constexprs,
the chosen config), except for a few per-call facts that Triton specializes on:
  * an integer argument: whether it is 1, divisible by 16, and fits in 32 bits;
  * a pointer argument: whether it is 16-byte aligned (a view can start anywhere).
(Tensor descriptors specialize on dtype and block shape only.) So the call site passes ``key``,
a tuple of those facts for the arguments that vary between its calls; the first call at a key
goes through Triton as usual (autotuning included), the compiled kernel and config it chose are
kept, and later calls at that key call the compiled launcher with fresh arguments.

Not used (Triton's own path every call): under the CPU interpreter, while a launch hook is set
(a profiler such as proton wants to see every launch), with OCTET_FAST_LAUNCH=0, and when Triton's
internals are not what this module expects (a launcher that takes other arguments makes the
validating launch at the first call of a key raise): that is logged once. Every argument is
passed fresh on every call: nothing but constexprs is cached.
"""
from __future__ import annotations

import logging
import os
from typing import Callable, NamedTuple, Optional

import triton

from . import triton_support

log = logging.getLogger("octet")
_warned: set = set()


def enabled() -> bool:
    return (os.environ.get("OCTET_FAST_LAUNCH", "1") != "0" and not triton_support.interpreting()
            and triton_support.unavailable_reason() is None)


def _hook_set(hook) -> bool:
    # Triton 3.5+ keeps each hook as a HookChain that is never None: set means it holds a call.
    return hook is not None and bool(getattr(hook, "calls", True))


def _hooks_set() -> bool:
    runtime = getattr(getattr(triton, "knobs", None), "runtime", None)
    if runtime is None:  # Triton before knobs kept the hooks on CompiledKernel
        from triton.compiler import CompiledKernel
        return _hook_set(getattr(CompiledKernel, "launch_enter_hook", None)) \
            or _hook_set(getattr(CompiledKernel, "launch_exit_hook", None))
    return _hook_set(runtime.launch_enter_hook) or _hook_set(runtime.launch_exit_hook)


def _is_jit(kernel) -> bool:
    # Not hasattr(kernel, "arg_names"): Triton's Autotuner has one too (3.6), and then its config was lost.
    from triton.runtime.jit import JITFunction
    try:   # under TRITON_INTERPRET=1 @triton.jit makes these instead (direct launches are off there)
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        InterpretedFunction = JITFunction
    return isinstance(kernel, (JITFunction, InterpretedFunction))


def _driver():
    from triton.runtime import driver
    return driver.active


def facts(*values) -> tuple:
    """The specialization facts of ``values`` for a key: an int gives 1 (equal to 1), 16 (divisible
    by 16) or 0; a tensor whether its data is 16-byte aligned. (Every int we pass fits in 32 bits:
    the wrappers refuse larger problems.)"""
    return tuple((1 if v == 1 else 16 if v % 16 == 0 else 0) if isinstance(v, int) else v.data_ptr() % 16 == 0
                 for v in values)


class WeightDescriptors:
    """A 2-D weight's TMA descriptors, one per box (BLOCK_N, BLOCK_K), made once each. Box (16, 16) is
    the placeholder Triton's path hands its autotuner, whose pre-hook resets the box before each
    launch, so that descriptor is never one a direct launch uses."""

    def __init__(self, weight2d):
        self.weight = weight2d
        self.boxes: dict = {}

    def get(self, meta: Optional[dict]):
        from triton.tools.tensor_descriptor import TensorDescriptor
        box = (16, 16) if meta is None else (meta["BLOCK_N"], meta["BLOCK_K"])
        desc = self.boxes.get(box)
        if desc is None:
            desc = self.boxes[box] = TensorDescriptor.from_tensor(self.weight, list(box))
        return desc


class Record(NamedTuple):
    run: Callable            # the compiled kernel's launcher
    function: int            # the CUfunction handle
    packed: object           # the launcher's packed metadata
    meta: dict               # constexpr flags and the chosen config's kwargs (what grid() and build() read)
    tail: tuple              # constexpr values, in the kernel's argument order, after the runtime arguments


class Launcher:
    """One Triton kernel (``@triton.jit``, optionally ``@triton.autotune``d) and its compiled launchers by key."""

    def __init__(self, kernel, name: str):
        self.kernel = kernel
        self.jit = kernel
        while not _is_jit(self.jit):   # Autotuner / Heuristics wrap the JITFunction in .fn
            self.jit = self.jit.fn
        self.autotuned = self.jit is not kernel
        self.name = name
        self.records: dict = {}
        self.direct = enabled()
        if self.direct:
            active = _driver()
            self._stream, self._device = active.get_current_stream, active.get_current_device

    def __call__(self, key: tuple, grid: Callable[[dict], tuple], build: Callable[[Optional[dict]], tuple],
                 flags: dict) -> None:
        """Launch once. ``build(meta)`` returns the runtime arguments (positional, in kernel order);
        ``meta`` is None on Triton's path (the autotuner's pre-hooks fix descriptor boxes there) and the
        chosen config's kwargs + flags on the direct path. ``grid(meta)`` gives the launch grid."""
        if self.direct:
            # Compiled kernels belong to a device (Triton compiles for the current one, as here).
            key = (self._device(), key)
            record = self.records.get(key)
            if record is not None:
                self._launch(record, grid, build(record.meta), key[0])
                return
        args = build(None)
        self.kernel[grid](*args, **flags)
        if self.direct:
            self._learn(key, args, flags, build, grid)

    def _launch(self, record: Record, grid, args: tuple, device: int) -> None:
        g = grid(record.meta)
        record.run(g[0], g[1] if len(g) > 1 else 1, g[2] if len(g) > 2 else 1, self._stream(device),
                   record.function, record.packed, None, None, None, *args, *record.tail)

    def _learn(self, key, args, flags, build, grid) -> None:
        try:
            if _hooks_set():
                return
            config = getattr(self.kernel, "best_config", None) if self.autotuned else None
            if self.autotuned and config is None:
                return
            kwargs, meta = dict(flags), dict(flags)
            if config is not None:
                kwargs.update(config.all_kwargs())
                meta.update(config.kwargs)
            names = list(self.jit.arg_names)
            rest = names[len(args):]
            if any(name not in meta for name in rest):
                raise TypeError(f"arguments after the runtime ones are not all constexprs: {rest}")
            fixed = build(meta)
            compiled = self.jit.run(*fixed, grid=(1,), warmup=True, **kwargs)
            record = Record(compiled.run, compiled.function, compiled.packed_metadata, meta,
                            tuple(meta[name] for name in rest))
            # Once more through the direct path with the same arguments (our kernels are pure functions
            # of their inputs, so the outputs do not change): a launcher that takes other arguments
            # raises here, once, instead of in a later call.
            self._launch(record, grid, fixed, key[0])
            self.records[key] = record
        except Exception as exc:  # a Triton whose internals differ: keep its own path, say so once
            self.direct = False
            if self.name not in _warned:
                _warned.add(self.name)
                log.warning("octet: direct launches of the Triton kernel %s are off (%s: %s); every launch goes "
                            "through Triton's dispatch (correct, ~3x the host time)", self.name,
                            type(exc).__name__, exc)


_shared: dict = {}


def shared(kernel, name: str) -> Launcher:
    """The process's one Launcher of a module-level kernel (no prepared object owns it: the q/k, GroupNorm and
    GEGLU kernels), made at its first launch so that it reads the environment (OCTET_FAST_LAUNCH, the
    interpreter) when it is used, not at import."""
    launcher = _shared.get(name)
    if launcher is None:
        launcher = _shared[name] = Launcher(kernel, name)
    return launcher
