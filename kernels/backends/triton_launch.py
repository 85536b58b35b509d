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
passed fresh on every call: nothing but constexprs (and a weight's TMA descriptor, see below) is cached.

One layer further down (``_c_launcher``): Triton 3.5/3.6's compiled launcher is a Python object whose
``__call__`` builds scratch-allocation closures and whose wrapper re-encodes every TMA descriptor
argument (``make_tensordesc_arg`` -> ``cuTensorMapEncodeTiled``) on every launch, the weight's
included, before it calls the generated C function. (A weight's map is kept per weight address: an
offload and reload gives the same Parameter new storage.) On the H200 (diag of 2026-12-02 18:15) our GEMM's
launch cost 12.5 us that way and 7.2 us calling the C function with the weight's descriptor encoded
once; an activation's descriptor is built from a ``Tma`` tuple rather than a ``TensorDescriptor`` (whose
validating constructor cost 1.6-2.9 us) and its map kept per address and shape (a layer's scratch codes
come back at the same address every step).
Where the launcher is not that exact shape (other Triton versions, scratch memory, clusters) the
compiled launcher is called as before.
"""
from __future__ import annotations

import logging
from typing import Callable, NamedTuple, Optional

import torch
import triton

from .. import registry, switches
from . import triton_support

log = logging.getLogger("octet")
_warned: set = set()


def enabled() -> bool:
    return (switches.on("OCTET_FAST_LAUNCH") and not triton_support.interpreting()
            and triton_support.unavailable_reason() is None)


def binding() -> bool:
    """Whether plans may keep a bound call per input (a learned record's C launcher and every fixed argument,
    made after the first call there): ``OCTET_BIND=0`` keeps the general path on every call (benches)."""
    return switches.on("OCTET_BIND")


class _Declined:
    """BoundCalls' mark for a key whose inputs the kernels do not take (the caller runs the host's ops)."""

    def __bool__(self):
        return False

    def __repr__(self):
        return "DECLINED"


DECLINED = _Declined()


class BoundCalls(dict):
    """One plan's (or call site's) bound calls by input key; False marks a key that takes the general path,
    DECLINED one the kernels do not take. A plan looks its key up on every call; after the first call at a new
    key it calls ``open(key)`` and, where that returns True, may store the bound call it makes. At most 64 keys:
    a video model's changing lengths start it over rather than grow it. ``binding()`` is read once, when the plan
    is made."""

    LIMIT = 64

    def __init__(self):
        super().__init__()
        self.enabled = binding()

    def open(self, key) -> bool:
        """Mark ``key`` as taking the general path; whether the caller may bind it instead."""
        if len(self) >= self.LIMIT:
            self.clear()
        self[key] = False
        return self.enabled

    def decline(self, key) -> None:
        """Mark ``key`` as one the kernels do not take."""
        self.open(key)
        self[key] = DECLINED

    def call(self, key, run: Callable, bind: Callable, args: tuple, takes: Optional[Callable] = None):
        """A call site's call at ``key`` (one protocol for every site: triton_groupnorm.GroupNorm, triton_geglu.Geglu,
        triton_conv.ConvW8A8): its bound call, or ``run(*args)`` where that returns None (another current device)
        or where the key takes the general path; at a new key ``run(*args)`` then ``bind(key, *args)``, after
        ``takes(*args)`` where given: a "no" there is remembered (DECLINED) and answered None, the caller then
        running the host's ops."""
        call = self.get(key)
        if call:
            out = call(*args)
            if out is not None:
                return out
        elif call is None:
            if takes is not None and not takes(*args):
                self.decline(key)
                return None
            out = run(*args)
            bind(key, *args)
            return out
        elif call is DECLINED:
            return None
        return run(*args)


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
            # Direct C launches encode it once per kernel and weight address (_c_launcher). Not the
            # placeholder box, which Triton's autotuner re-boxes before its launches.
            if meta is not None:
                desc.octet_expanded = {}
        return desc


class Tma(NamedTuple):
    """An activation's TMA descriptor as a direct launch passes it: what Triton's launcher reads of a
    ``TensorDescriptor`` (base, shape, strides, padding), without its constructor's checks (the wrapper
    building it has checked shape, alignment and strides already). Triton's own path (the first call
    at a key) still gets real ``TensorDescriptor``s."""
    base: object
    shape: tuple
    strides: tuple
    block_shape: tuple
    padding: str = "zero"


def for_triton(args: tuple) -> tuple:
    """``args`` with each ``Tma`` as the ``TensorDescriptor`` Triton's own entry points specialize on (its
    compile lookup here; a wrapper's launch with a given config, no autotuner)."""
    if not any(isinstance(a, Tma) for a in args):
        return args
    from triton.tools.tensor_descriptor import TensorDescriptor
    return tuple(TensorDescriptor(a.base, list(a.shape), list(a.strides), list(a.block_shape), a.padding)
                 if isinstance(a, Tma) else a for a in args)


class Record(NamedTuple):
    run: Callable            # the compiled kernel's launcher
    function: int            # the CUfunction handle
    packed: object           # the launcher's packed metadata
    meta: dict               # constexpr flags and the chosen config's kwargs (what grid() and build() read)
    tail: tuple              # constexpr values, in the kernel's argument order, after the runtime arguments
    c_launch: Optional[Callable] = None   # (gx, gy, gz, stream, args) -> the C launcher, or None: run()


def _c_launcher(compiled, tail: tuple) -> Optional[Callable]:
    """A function launching ``compiled`` through Triton 3.5/3.6's generated C launcher, with the
    descriptor expansion Triton's wrapper does per launch done here, once for weight descriptors
    (``WeightDescriptors`` marks them) and per call for the others; None where the launcher is not
    exactly the shape this was written against (then ``compiled.run`` is used)."""
    run = compiled.run
    if type(run).__name__ != "CudaLauncher" or getattr(run, "num_ctas", 1) != 1 \
            or getattr(run, "global_scratch_size", 1) or getattr(run, "profile_scratch_size", 1):
        return None
    function, packed = compiled.function, compiled.packed_metadata
    coop, pdl = run.launch_cooperative_grid, run.launch_pdl
    wrapped = run.launch
    code = getattr(wrapped, "__code__", None)
    if code is None:   # the C function itself: no descriptor among the arguments
        def launch(gx, gy, gz, stream, args):
            wrapped(gx, gy, gz, stream, function, coop, pdl, None, None, packed, None, None, None, *args, *tail)
        return launch
    if code.co_freevars != ("launcher", "tensordesc_indices", "tensordesc_meta"):
        return None
    free = dict(zip(code.co_freevars, (cell.cell_contents for cell in wrapped.__closure__)))
    c_function, metas = free["launcher"], free["tensordesc_meta"]
    make = wrapped.__globals__.get("make_tensordesc_arg")
    if make is None or make.__code__.co_argcount != 2 or not metas or any(m is None for m in metas):
        return None
    descs = tuple(zip(sorted(free["tensordesc_indices"]), metas))
    # An activation's map, per (its metadata, address, shape, strides, padding): the map is a function of
    # exactly those (element type, swizzle and box come from the metadata), so a kept one is the map
    # make() would encode. A plan's scratch codes (scratch.py) keep one address per (M, K), so an eager
    # step's layers find theirs here instead of encoding it on every call.
    activations: dict = {}

    def launch(gx, gy, gz, stream, args):
        final, start = [], 0
        for pos, meta in descs:
            final += args[start:pos]
            arg = args[pos]
            cache = getattr(arg, "octet_expanded", None)   # a weight's descriptor: encoded once per kernel
            if cache is None:
                if type(arg) is Tma:
                    key = (id(meta), arg.base.data_ptr(), arg.shape, arg.strides, arg.padding)
                    expanded = activations.get(key)
                    if expanded is None:
                        if len(activations) >= 64:
                            activations.clear()
                        expanded = activations[key] = make(arg, meta)
                    final += expanded
                else:
                    final += make(arg, meta)
            else:
                # Keyed by the weight's address too: ComfyUI's offload and reload move a weight by swapping
                # its Parameter's storage (Module._apply sets .data), and the map holds the old address.
                key = (id(meta), arg.base.data_ptr())
                expanded = cache.get(key)
                if expanded is None:
                    if len(cache) >= 8:
                        cache.clear()
                    expanded = cache[key] = make(arg, meta)
                final += expanded
            start = pos + 1
        final += args[start:]
        c_function(gx, gy, gz, stream, function, coop, pdl, None, None, packed, None, None, None, *final, *tail)
    return launch


class Launcher:
    """One Triton kernel (``@triton.jit``, optionally ``@triton.autotune``d) and its compiled launchers by key."""

    def __init__(self, kernel, name: str, learns: Optional[bool] = None):
        self.kernel = kernel
        self.jit = kernel
        while not _is_jit(self.jit):   # Autotuner / Heuristics wrap the JITFunction in .fn
            self.jit = self.jit.fn
        self.autotuned = self.jit is not kernel
        self.name = name
        self.records: dict = {}
        # ``learns`` None: unless made for a plan used once (registry.one_call_plans). Learning a key's direct
        # launch looks the compiled kernel up and launches it twice more (through the direct path and the C
        # launcher, so that a launcher that cannot take these arguments fails once, early): a kept plan pays
        # that at its first call per key, a per-call plan (a streamed layer) at every call. Measured on an H100
        # (bench/gemm_operands.py, 2026-12-06): Wan's FFN up through a fresh W8A8Gemm per call 1108 us on the
        # GPU against 367 through one built once.
        if learns is None:
            learns = not registry.planning_one_call()
        self.direct = learns and enabled()
        if self.direct:
            active = _driver()
            self._stream, self._device = active.get_current_stream, active.get_current_device
            # torch.cuda.current_device without its lazy-init shim: a direct launch follows Triton's own first
            # launch at its key, which initialised CUDA (two per INT8 layer call, ~0.3 us each).
            if self._device is torch.cuda.current_device and hasattr(torch._C, "_cuda_getDevice"):
                self._device = torch._C._cuda_getDevice

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

    def learned(self, key: tuple) -> Optional[Record]:
        """The record a direct launch at ``key`` uses on the current device, if one was learned and has Triton's
        C launcher (``c_launch``); a caller that binds it launches with ``record.c_launch(gx, gy, gz,
        self.stream(device), args)`` and must itself check that the current device is still that one."""
        if not self.direct:
            return None
        record = self.records.get((self._device(), key))
        return record if record is not None and record.c_launch is not None else None

    def current_device(self) -> int:
        return self._device()

    def stream(self, device: int):
        return self._stream(device)

    def _launch(self, record: Record, grid, args: tuple, device: int) -> None:
        g = grid(record.meta)
        gx, gy, gz = g[0], g[1] if len(g) > 1 else 1, g[2] if len(g) > 2 else 1
        if record.c_launch is not None:
            record.c_launch(gx, gy, gz, self._stream(device), args)
        else:
            record.run(gx, gy, gz, self._stream(device), record.function, record.packed, None, None, None,
                       *args, *record.tail)

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
            compiled = self.jit.run(*for_triton(fixed), grid=(1,), warmup=True, **kwargs)
            tail = tuple(meta[name] for name in rest)
            record = Record(compiled.run, compiled.function, compiled.packed_metadata, meta, tail)
            # Once more through the direct path with the same arguments (our kernels are pure functions
            # of their inputs, so the outputs do not change): a launcher that takes other arguments
            # raises here, once, instead of in a later call. The C launcher likewise, else run().
            self._launch(record, grid, fixed, key[0])
            record = self._with_c_launcher(record, compiled, grid, fixed, key[0])
            self.records[key] = record
        except Exception as exc:  # a Triton whose internals differ: keep its own path, say so once
            self.direct = False
            if self.name not in _warned:
                _warned.add(self.name)
                log.warning("octet: direct launches of the Triton kernel %s are off (%s: %s); every launch goes "
                            "through Triton's dispatch (correct, ~3x the host time)", self.name,
                            type(exc).__name__, exc)

    def _with_c_launcher(self, record: Record, compiled, grid, args: tuple, device: int) -> Record:
        if not switches.on("OCTET_C_LAUNCH"):
            return record
        try:
            c_launch = _c_launcher(compiled, record.tail)
            if c_launch is None:
                return record
            record = record._replace(c_launch=c_launch)
            self._launch(record, grid, args, device)
            return record
        except Exception as exc:  # keep the compiled launcher (still direct), say so once
            if self.name + ":c" not in _warned:
                _warned.add(self.name + ":c")
                log.warning("octet: Triton's C launcher of %s cannot be called directly (%s: %s); its Python "
                            "launcher is used (correct, ~5 us more per launch)", self.name, type(exc).__name__, exc)
            return record._replace(c_launch=None)


_shared: dict = {}


def shared(kernel, name: str) -> Launcher:
    """The process's one Launcher of a module-level kernel (no prepared object owns it: the q/k, GroupNorm and
    GEGLU kernels), made at its first launch so that it reads the environment (OCTET_FAST_LAUNCH, the
    interpreter) when it is used, not at import."""
    launcher = _shared.get(name)
    if launcher is None:
        launcher = _shared[name] = Launcher(kernel, name, learns=True)    # the process's: always worth learning
    return launcher
