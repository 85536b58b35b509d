"""CUDA Graph Step: replay each diffusion-model call of a MODEL from a captured CUDA graph.

Installed as an APPLY_MODEL wrapper (ComfyUI 0.3.75 and 0.29 both have it, and it wraps every
model family; the DIFFUSION_MODEL wrapper misses SD3's MMDiT), so the stock KSampler, INT8
Sampler and any other sampler use it unchanged. The captured region is ``BaseModel._apply_model``:
input scaling, dtype casts, the diffusion model and the denoised output.

Other APPLY_MODEL wrappers (Octet's timestep groups, INT8 Sampler's step timer, other packs')
always run in Python around the replay, whatever their order: we call the ones stacked inside us
ourselves, around the graph. They see every call exactly as in eager mode.

A graph is reused only for a call that would launch the same work on the same memory. The key
holds: every input tensor's shape/dtype/device and every plain input value (conditioning keys
c_crossattn, y, guidance, control... and their shapes), cond/uncond batching, tensor shapes and
plain values in transformer_options, each timestep-group index of Octet's static layers (the
group picks which static scale tensor a layer reads, so a group change is a different graph),
grad/inference/autocast mode. Whenever the weights may have moved (another patcher, LoRA on or off,
load/unload), every graph is dropped; when the host unloads the model, its graphs' memory goes with it.
Anything we cannot vouch for runs eager, logged once with why: among those, forward hooks on the
model's layers (a profiler's, another pack's: a replay would skip them) and a capture that would
leave less free VRAM than ComfyUI keeps for inference (kernels/vram.py; checked before capturing, with
the warm-up's peak, and after, with the graph's pool).

Quantize Model and Load Quantized install it themselves (their ``cuda_graph`` widget, ``auto`` = on
with the speed goal): a user's stock workflow then replays graphs without this node. Installed that
way (``auto``), its eager fallbacks are logged at INFO, since nobody asked for graphs by name.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch.utils import _pytree as pytree

from ..kernels import vram
from ..octet.cuda_graph import (CaptureRefused, GraphBackend, GraphCache, ShortOfMemory, Unkeyable, capture,
                                flatten, signature)
from ..octet.modules import QuantLayer
from . import host_compat
from .bridge import set_apply_model_wrapper

log = logging.getLogger("octet")
WRAPPER_KEY = "octet_cuda_graph_step"
PACKAGE = __name__.rsplit(".nodes.", 1)[0]
# APPLY_MODEL wrappers run outside the graph (see above); DIFFUSION_MODEL wrappers would be inside.
SAFE_DIFFUSION_WRAPPERS: frozenset = frozenset()
SAFE_OBJECT_PATCHES = ("model_sampling",)  # ModelSampling* nodes: sigma arithmetic on tensors
# transformer_options entries that do not reach the captured work or change per run only.
IGNORED_OPTIONS = ("wrappers", "callbacks", "uuids")
INSIDE_PATCHES = ("patches", "patches_replace")  # attention/block patches: code inside the graph


class Eager(Exception):
    """Why this call runs eager (the message is logged once per GraphStep)."""


@dataclass
class GraphStep:
    """The wrapper: one per CUDA Graph Step node output, shared by the clones made from it."""
    capacity: int = 4
    warmup: int = 2
    backend: GraphBackend = field(default_factory=GraphBackend)
    cache: GraphCache = None
    stats: dict = field(default_factory=lambda: {"replays": 0, "captures": 0, "eager": 0, "invalidations": 0})
    _said: set = field(default_factory=set)
    _weights: tuple = None            # (patcher, patches uuids) the graphs were captured under
    _slots: list = field(default_factory=list)     # (module._parameters or ._buffers, name) of the diffusion model
    _pointers: tuple = ()             # their tensors' data_ptr at capture: a move or reload changes them
    _selectors: list = field(default_factory=list)  # Octet GroupSelectors of static layers
    _modules: list = field(default_factory=list)    # (name, module) of the diffusion model: hooks check
    _thrash: bool = False
    _declined: str = None             # why these weights cannot be replayed (dynamic VRAM's staged modules)
    _short: set = field(default_factory=set)        # keys not captured for want of VRAM (retried after a release)
    auto: bool = False                # installed by default (Quantize Model / Load Quantized), not by the node

    def __post_init__(self):
        if self.cache is None:
            self.cache = GraphCache(self.capacity)

    # -- the wrapper --------------------------------------------------------------------------
    def __call__(self, executor, *args, **kwargs):
        import comfy.patcher_extension as pe
        inner = executor.wrappers[executor.idx + 1:]

        def step(*a, **k):
            return self.step(executor.original, executor.class_obj, a, k)
        if inner:
            return pe.WrapperExecutor.new_class_executor(step, executor.class_obj, inner).execute(*args, **kwargs)
        return step(*args, **kwargs)

    def step(self, original, base_model, args: tuple, kwargs: dict):
        try:
            device, options = self._check(base_model, args, kwargs)
            # From here on the inputs are the ones _key moved to the device (see there): an eager fallback
            # runs on them too, rather than copying the conditioning to the GPU a second time.
            key, leaves, spec, args, kwargs = self._key(args, kwargs, options, device)
        except Eager as why:
            return self._eager(original, args, kwargs, str(why))
        graph = self.cache.get(key)
        if graph is None:
            if key in self.cache.failed:
                return self._eager(original, args, kwargs, self.cache.failed[key])
            graph = self._capture(original, key, leaves, spec, options, device)
            if graph is None:
                return self._eager(original, args, kwargs, self.cache.failed[key])
        self.stats["replays"] += 1
        return graph.run(leaves)

    # -- safety ------------------------------------------------------------------------------
    def _check(self, base_model, args, kwargs):
        x = args[0] if args else kwargs.get("x")
        if not isinstance(x, torch.Tensor):
            raise Eager("the model was called without a latent tensor")
        if not self.backend.supports(x.device):
            raise Eager(f"the model runs on {x.device.type}: CUDA graphs need a CUDA device")
        if torch.is_grad_enabled():
            raise Eager("autograd is on (training or a gradient-based sampler): graphs are captured for inference")
        if self._thrash:
            raise Eager(f"graph keys changed on almost every call ({self.cache.captures} captures): "
                        f"an input that varies per step is part of the key")
        patcher = getattr(base_model, "current_patcher", None)
        if patcher is None:
            raise Eager("no ModelPatcher is driving this model (sample through a sampler node)")
        model = patcher.model
        if getattr(model, "model_lowvram", False) or getattr(model, "lowvram_patch_counter", 0):
            self._release("model partially unloaded")   # the host made room: give the graphs' memory too
            raise Eager("the model is partially loaded (lowvram / offload): weights move during the step")
        if getattr(patcher, "hook_patches", None) or getattr(patcher, "current_hooks", None):
            raise Eager("the model has hooks (scheduled LoRA / keyframes): weights change between steps")
        for name, patch in patcher.object_patches.items():
            if not _safe_object_patch(name, patch):
                raise Eager(f"object patch '{name}' ({type(patch).__name__}) is not known to be graph-safe")
        options = _transformer_options(args, kwargs)
        wrappers = options.get("wrappers", {})
        unsafe = [k for k, fns in wrappers.get("diffusion_model", {}).items()
                  if fns and k not in SAFE_DIFFUSION_WRAPPERS]
        if unsafe:
            raise Eager(f"diffusion_model wrapper(s) {unsafe} would run inside the graph and are not known "
                        f"to be graph-safe")
        for name in INSIDE_PATCHES:
            if options.get(name):
                raise Eager(f"transformer_options['{name}'] {sorted(options[name])} would run inside the graph "
                            f"and is not known to be graph-safe")
        self._check_weights(patcher)
        hooked = _hooked_module(self._modules)
        if hooked:
            raise Eager(f"forward hook(s) on {hooked} (a profiler or another pack observing the layers): "
                        f"a replay would skip them")
        return x.device, options

    def _check_weights(self, patcher):
        state = (id(patcher), getattr(patcher, "patches_uuid", None),
                 getattr(patcher.model, "current_weight_patches_uuid", None))
        # Every call: a reload or .to() moves parameters without touching uuids, and a graph would
        # then read freed memory. Read through the modules' dicts, not kept tensors: a host that replaces a
        # Parameter (0.29's dynamic load at every prompt) leaves the old object, and its memory, intact.
        # ~0.5 ms for SDXL's ~2500 tensors on a loaded CPU; in the step times.
        if state == self._weights and self._current_pointers() == self._pointers:
            if self._declined:
                raise Eager(self._declined)
            return
        dropped = self.cache.clear()
        if self._weights is not None:
            self.stats["invalidations"] += 1
            self._say(f"weights changed (another MODEL clone, LoRA on/off, or a reload): "
                      f"{dropped} graph(s) dropped, recapturing", level=logging.INFO, once=False)
        dm = patcher.model.diffusion_model
        self._slots = [(d, name) for m in dm.modules() for d in (m._parameters, m._buffers)
                       for name, t in d.items() if t is not None]
        self._pointers = self._current_pointers()
        self._modules = list(dm.named_modules())
        self._selectors = list({id(s): s for _, m in self._modules
                                if (s := getattr(m, "group_selector", None)) is not None}.values())
        self._weights = state
        self._declined = None
        # ComfyUI >= 0.29's dynamic VRAM (its default on NVIDIA) stages comfy.ops modules' weights through
        # comfy-aimdo: each call casts or fetches them, outside anything a replay would repeat. Where it staged
        # none (an Octet model's layers load whole, as do small modules), the weights are plain device tensors
        # and a load that moves them changes the pointers checked above. Staging only happens at a load, which
        # moves what it restages, so this is decided again exactly when the pointers change.
        staged = [n for n, m in self._modules if hasattr(m, "_v")] if host_compat.dynamic_vram(patcher) else []
        if staged:
            modules = dict(self._modules)
            ours = [n for n in staged if isinstance(modules[n], QuantLayer)]
            fix = ("free VRAM (they did not fit: nodes/dynamic_vram.py) to replay graphs" if ours else
                   "start ComfyUI with --disable-dynamic-vram (or --highvram) to replay graphs")
            self._declined = (f"dynamic VRAM (ComfyUI >= 0.29's default on NVIDIA) streams the weights of "
                              f"{len(staged)} module(s) ({', '.join(staged[:3])}{', ...' if len(staged) > 3 else ''})"
                              f"{f', {len(ours)} of them INT8 layers,' if ours else ''} at every call: {fix}")
            raise Eager(self._declined)
        off = next((d[n].device for d, n in self._slots if not self.backend.supports(d[n].device)), None)
        if off is not None:
            self._weights = None  # check again next call: the host may still be loading
            raise Eager(f"part of the model's weights are on {off}: it is not fully loaded on the GPU")

    def _current_pointers(self) -> tuple:
        return tuple(0 if (t := d.get(n)) is None else t.data_ptr() for d, n in self._slots)

    # -- key ---------------------------------------------------------------------------------
    def _key(self, args, kwargs, options, device):
        tensors, plain = {}, []
        for name, value in sorted(options.items()):
            if name in IGNORED_OPTIONS or name in INSIDE_PATCHES:
                continue
            if isinstance(value, torch.Tensor):
                tensors[name] = value
                continue
            if getattr(value, "graph_safe", False):     # octet/attention.py's override: its kernels capture
                plain.append((name, repr(value)))
                continue
            try:
                plain.append((name, signature(flatten(value)[0])))
            except Unkeyable as e:
                raise Eager(f"transformer_options['{name}'] holds a {e}, neither a tensor nor a plain value; "
                            f"what it does inside the model cannot be keyed")
        # transformer_options leaves the flat inputs (its callables cannot be keyed); its tensors
        # join them, and ``_capture`` puts it back in its place.
        # The sampler hands over conditioning on the CPU (ComfyUI keeps conds there; BaseModel._apply_model
        # casts every tensor it is given to the model's device itself). A graph cannot: a copy from pageable
        # host memory cannot be captured, and its values would be baked in. So they go to the device here,
        # before the static buffers; the model's own cast then finds them there (a no-op, or the same dtype
        # conversion on the device: bit-identical, measured in bench/workflow.py).
        def move(v):
            return v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) and v.device != device else v
        args = tuple(a if a is options else pytree.tree_map(move, a) for a in args)
        kwargs = {k: v if v is options else pytree.tree_map(move, v) for k, v in kwargs.items()}
        call = ([a for a in args if a is not options], {k: v for k, v in kwargs.items() if v is not options}, tensors)
        leaves, spec = flatten(call)
        try:
            sig = signature(leaves, device)
        except Unkeyable as e:
            raise Eager(f"a model input is a {e}, neither a tensor on the model's device nor a plain value; "
                        f"it cannot be keyed")
        modes = (torch.is_inference_mode_enabled(), torch.is_autocast_enabled())
        groups = tuple(s.index for s in self._selectors)
        where = _options_position(args, kwargs, options)
        return (sig, tuple(plain), spec, groups, modes, where), leaves, spec, args, kwargs

    # -- capture / eager -----------------------------------------------------------------------
    def _capture(self, original, key, leaves, spec, options, device):
        where = key[-1]

        def run(call):
            a, k, tensors = call
            opts = dict(options, **tensors)  # transformer_options with its tensors in static buffers
            a = list(a)
            if where == "kw":
                k = dict(k, transformer_options=opts)
            elif where is not None:
                a.insert(where, opts)
            return original(*a, **k)
        graph, why = None, None
        # A plain capture first; where it fails, once more with the device as torch's default device:
        # a forward that builds a host tensor per call (Wan's timestep embedding) then builds it there.
        for factories_on_device in (False, True):
            try:
                graph = capture(run, leaves, spec, device, self.backend, self.warmup, factories_on_device,
                                keep=vram.reserve(device))
                break
            except ShortOfMemory as e:
                # Until the host frees memory (an unload, another clone loaded): _release forgets it.
                self.cache.failed[key] = f"{e}; this input signature runs eager until then"
                self._short.add(key)
                return None
            except Exception as e:  # noqa: BLE001 - any capture failure: eager for this key, said once
                cause = e.__cause__ if isinstance(e, CaptureRefused) and e.__cause__ is not None else e
                first = str(cause).splitlines()[0][:200] if str(cause) else ""
                why = why or f"{type(cause).__name__}: {first}"
                _end_broken_capture()
                if not isinstance(e, CaptureRefused):
                    break       # the warm-up failed (out of memory, a model error): another try would too
        if graph is None:
            # A warm-up error is a model error: the eager call that follows raises it again.
            self.cache.failed[key] = f"capture failed ({why}); this input signature stays eager"
            return None
        if factories_on_device:
            self._say(f"the model's forward builds tensors without naming a device ({why}); its graph was captured "
                      f"with {device} as the default device", level=logging.INFO)
        short = self._short_of_memory(graph, device)
        if short:
            del graph                           # its pool goes with it
            self.backend.memory(device)         # and back to the device
            self.cache.failed[key] = short
            return None
        evicted = self.cache.put(key, graph)
        self.stats["captures"] += 1
        # Fewer than two replays per capture over many captures: a per-call value is in the key.
        if self.cache.captures > 4 * self.cache.capacity and 2 * self.cache.captures > self.stats["replays"]:
            self._thrash = True
        log.info("Octet CUDA Graph Step: captured graph %d (cache %d/%d) in %.2f s, memory %.1f MiB%s; "
                 "cached graphs hold %.1f MiB", self.cache.captures, len(self.cache.graphs), self.cache.capacity,
                 graph.capture_s, graph.bytes / 2**20, f", evicted {len(evicted)}" if evicted else "",
                 self.cache.bytes / 2**20)
        return graph

    def _short_of_memory(self, graph, device) -> str | None:
        """Why a captured graph is not kept: what it holds (its pool stays reserved while it lives, and
        ComfyUI's memory planning does not see it) would leave less free VRAM than the host keeps for
        inference (a VAE decode, the next model's activations). None: keep it."""
        free = self.backend.free_memory(device)     # capture's last measurement has just returned torch's cache
        keep = vram.reserve(device)
        if free >= keep:
            return None
        return (f"the captured graph holds {graph.bytes / 2**20:.0f} MiB and would leave {free / 2**20:.0f} MiB "
                f"of VRAM free, less than the {keep / 2**20:.0f} MiB ComfyUI keeps for inference; this input "
                f"signature stays eager")

    def _eager(self, original, args, kwargs, why: str):
        self.stats["eager"] += 1
        self._say(f"running eager: {why}")
        return original(*args, **kwargs)

    def on_detach(self, patcher, unpatch_all=True):
        """The host unloaded the model: drop the graphs, whose memory ComfyUI counts as freed by the unload.

        Both hosts also detach with ``unpatch_all=False`` at the start of every sampling run
        (load_models_gpu hands the model over to itself) and when a clone is garbage-collected: the
        graphs stay (the weight check covers those). When another clone of the model is loaded in this
        one's place (the float MODEL of the same checkpoint), the host no longer counts this one's
        memory: the graphs go now, and this one's next run captures again (tenths of a second)."""
        if unpatch_all:
            self._release("model unloaded")
        elif host_compat.clone_loading_in_place_of(patcher) is not None:
            self._release("another clone of the model is loaded in its place")

    def _release(self, why: str) -> None:
        dropped = self.cache.clear()
        for key in self._short:         # memory was freed: those may capture now
            self.cache.failed.pop(key, None)
        self._short.clear()
        self._weights = None
        if dropped:
            self._say(f"{why}: {dropped} graph(s) dropped with their memory", level=logging.INFO, once=False)

    def _say(self, message: str, level=None, once=True):
        if once and message in self._said:
            return
        self._said.add(message)
        if level is None:   # a fallback: a warning when the user asked for graphs with the node
            level = logging.INFO if self.auto else logging.WARNING
        log.log(level, "Octet CUDA Graph Step: %s", message)

    def report(self) -> str:
        s = self.stats
        lines = [f"CUDA Graph Step: {s['replays']} replays, {s['captures']} captures, {s['eager']} eager calls, "
                 f"{s['invalidations']} invalidations; {len(self.cache.graphs)}/{self.cache.capacity} graphs cached, "
                 f"{self.cache.bytes / 2**20:.1f} MiB"]
        lines += [f"  graph {i}: {g.bytes / 2**20:.1f} MiB, captured in {g.capture_s:.2f} s, {g.replays} replays"
                  for i, g in enumerate(self.cache.graphs.values())]
        lines += [f"  eager: {m}" for m in sorted(self._said)]
        return "\n".join(lines)


def _transformer_options(args, kwargs) -> dict:
    if "transformer_options" in kwargs:
        return kwargs["transformer_options"] or {}
    return args[5] if len(args) > 5 and isinstance(args[5], dict) else {}


def _options_position(args, kwargs, options):
    if "transformer_options" in kwargs:
        return "kw"
    return next((i for i, a in enumerate(args) if a is options), None)


def _safe_object_patch(name: str, patch) -> bool:
    if name in SAFE_OBJECT_PATCHES or isinstance(patch, QuantLayer):
        return True
    if isinstance(patch, torch.Tensor):
        # A buffer swapped for another tensor (Octet's int8 position table): read by address like any weight,
        # and the graphs are kept per patcher, so another patch set means another capture.
        return True
    # Octet's own forwards (static MLP chains) are graph-safe by construction.
    return getattr(patch, "__module__", "").startswith(PACKAGE + ".octet")


def _hooked_module(modules: list) -> str | None:
    """The first module (by name) with a forward or forward-pre hook, or 'every module' for a global one."""
    import torch.nn.modules.module as nn_module
    if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
        return "every module (a global hook)"
    for name, m in modules:
        if m._forward_hooks or m._forward_pre_hooks:
            return f"'{name or 'diffusion_model'}' ({type(m).__name__})"
    return None


def _end_broken_capture() -> None:
    """A failed capture can leave the stream in an error state; sync so the eager run starts clean."""
    if torch.cuda.is_available():
        try:
            torch.cuda.synchronize()
        except Exception:  # noqa: BLE001 - the eager call will raise the real error if any
            pass


def install(patcher, capacity: int = 4, warmup: int = 2, backend: GraphBackend | None = None):
    """A clone of ``patcher`` whose diffusion-model calls replay CUDA graphs. Returns (clone, GraphStep)."""
    step = GraphStep(capacity=capacity, warmup=warmup, backend=backend or GraphBackend())
    clone = patcher.clone()
    attach(clone, step)
    return clone, step


def attach(patcher, step: GraphStep) -> None:
    """Make ``step`` the graph wrapper of ``patcher`` (in place) and drop its graphs when the host unloads it."""
    import comfy.patcher_extension as pe
    set_apply_model_wrapper(patcher, WRAPPER_KEY, step)
    patcher.remove_callbacks_with_key(pe.CallbacksMP.ON_DETACH, WRAPPER_KEY)
    patcher.add_callback_with_key(pe.CallbacksMP.ON_DETACH, WRAPPER_KEY, step.on_detach)


CHOICES = ("auto", "on", "off")
AUTO_CAPACITY = 2
CHOICE_TIP = ("Replay each sampling step's diffusion-model call from a CUDA graph captured at its first step "
              "(one launch instead of thousands: the eager step of SDXL / SD3.5 is bound by the CPU issuing "
              "kernels). auto: on with goal 'speed', off with 'memory' (a graph keeps one step's activations "
              "reserved). Runs eager, saying why once, on a CPU, with lowvram / offload, hooks, unknown patches, or "
              "when the graph would leave less VRAM free than ComfyUI keeps for inference.")


def install_default(patcher, choice: str, goal: str) -> str:
    """Quantize Model's / Load Quantized's ``cuda_graph`` widget, on their own output clone (in place).
    Returns the report's line."""
    if choice not in CHOICES:
        raise ValueError(f"cuda_graph must be one of {', '.join(CHOICES)}, got {choice!r}")
    on = choice == "on" or (choice == "auto" and goal != "memory")
    if not on:
        why = "goal 'memory'" if choice == "auto" else "cuda_graph 'off'"
        return f"CUDA graphs: off ({why}): every step runs eager."
    # Two graphs (e.g. a hires-fix workflow's two sizes), not the node's four: a default should hold less memory
    # than a user who asked for graphs chose to spend.
    attach(patcher, GraphStep(auto=True, capacity=AUTO_CAPACITY))
    device = getattr(patcher, "load_device", None)
    where = ("" if GraphBackend().supports(device) else
             f" This MODEL loads on {device}: it will run eager.")
    return (f"CUDA graphs: on ({'goal speed' if choice == 'auto' else 'cuda_graph on'}): each step replays a "
            f"graph captured at the first step of a latent size (2 eager warm-up runs; at most {AUTO_CAPACITY} "
            f"graphs, memory logged); eager where unsafe, saying why once.{where}")


def graph_step_of(patcher) -> GraphStep | None:
    import comfy.patcher_extension as pe
    found = patcher.get_wrappers(pe.WrappersMP.APPLY_MODEL, WRAPPER_KEY)
    return found[-1] if found else None
