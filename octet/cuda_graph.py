"""Replay one function's GPU work from captured CUDA graphs, one graph per input signature.

A CUDA graph records the kernels a call launched, with their memory addresses; replaying it is one
launch instead of thousands dispatched from Python. It cannot record what the host decided:
shapes, dtypes, Python branches, which tensors were read. So a graph is valid only for calls that
would launch the same work on the same memory. ``GraphCache`` holds graphs under a key the caller
builds from everything that decides that work; each ``CapturedGraph`` owns static input buffers
(every call copies its tensors into them, since the graph reads those addresses) and its output,
which is cloned out because the next replay overwrites it. The cache is bounded (LRU): each graph
keeps its own memory pool alive.

Torch alone, plus telling the kernels they plan for a replay. Which calls are safe to capture, and
what their key holds, is the host's business (nodes/graph_step.py). ``GraphBackend`` is the one seam to CUDA, so the bookkeeping can be tested
on a CPU with a stand-in.
"""
from __future__ import annotations

import contextlib
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

import torch
from torch.utils import _pytree as pytree

from ..kernels import vram
from ..kernels.dispatch import graph_plans

PRIMITIVES = (type(None), bool, int, float, str, torch.dtype, torch.device)


class CaptureRefused(RuntimeError):
    """The warm-up ran, the capture itself failed (``__cause__``: what CUDA or torch said): something in the
    forward cannot be recorded, as opposed to a forward that fails anyway."""


class ShortOfMemory(RuntimeError):
    """The warm-up ran, and capturing would take more VRAM than is free beside the reserve: the graph's private pool
    holds the step's activations again (the eager step's cached blocks cannot serve it), and an allocation that
    fails inside a capture leaves torch's allocator routing to the broken pool (seen on an H200: every later
    allocation failed, empty_cache released nothing). Not captured; the step runs eager."""


class Unkeyable(Exception):
    """An input that is neither a tensor nor a plain value, so it cannot be part of a graph key."""


def flatten(tree) -> tuple[list, Any]:
    return pytree.tree_flatten(tree)


HOST_TENSOR_LIMIT = 1024  # elements: a small host tensor (a sigma schedule) is keyed by value


def signature(leaves: list, device: torch.device | None = None) -> tuple:
    """The part of a key the inputs decide: tensors by shape/dtype/device, plain values by value.

    Tensor values on ``device`` are not in the key: every call copies them into the static
    buffers, which the graph reads. A tensor elsewhere (a sigma schedule on the CPU) can only
    reach the captured work through the host, at capture time, so its value is part of the key.
    """
    sig = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor) and device is not None and leaf.device != device:
            if leaf.numel() > HOST_TENSOR_LIMIT:
                raise Unkeyable(f"{leaf.device} tensor of shape {tuple(leaf.shape)} (the model runs on {device})")
            sig.append(("H", tuple(leaf.shape), leaf.dtype, leaf.device, tuple(leaf.flatten().tolist())))
        elif isinstance(leaf, torch.Tensor):
            sig.append(("T", tuple(leaf.shape), leaf.dtype, leaf.device, leaf.requires_grad))
        elif isinstance(leaf, PRIMITIVES):
            sig.append(("V", type(leaf).__name__, leaf))
        else:
            raise Unkeyable(type(leaf).__name__)
    return tuple(sig)


class GraphBackend:
    """torch.cuda's graph API behind a few methods (tests substitute a CPU stand-in)."""

    def supports(self, device: torch.device) -> bool:
        return device.type == "cuda" and torch.cuda.is_available()

    def warmup(self, fn: Callable[[], Any], device: torch.device, runs: int) -> int:
        """Run ``fn`` ``runs`` times; returns the bytes it allocated at its peak beyond what was allocated before."""
        # torch requires warm-up on a side stream before capture: lazy initialisation (cuBLAS
        # workspaces, Triton autotuning, allocator growth) must not happen while capturing.
        start = torch.cuda.memory_allocated(device)
        # The process's peak so far would hide the warm-up's: any earlier larger allocation (a bigger model, a
        # VAE decode, a low-VRAM bench's filler) made every later capture look too big to fit, and the step ran
        # eager for good (the GPU tests after one that filled the card, H200 2026-12-04). So the peak is reset
        # here: ComfyUI does not read it, and Octet's own peak measurements (octet/metrics.py, nodes/evaluate.py,
        # the benches) reset it before they measure, as this does.
        torch.cuda.reset_peak_memory_stats(device)
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(runs):
                fn()
        torch.cuda.current_stream(device).wait_stream(stream)
        return max(0, torch.cuda.max_memory_allocated(device) - start)

    def capture(self, fn: Callable[[], Any], device: torch.device):
        """(graph, output): ``fn``'s work recorded, not run; ``graph.replay()`` runs it."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.device(device), torch.cuda.graph(graph):
            out = fn()
        return graph, out

    def memory(self, device: torch.device) -> int:
        # Reserved, not allocated: a graph's private pool keeps its segments after capture even
        # where the blocks inside are free, and those bytes are lost to everything else. Cached
        # free blocks are released first: torch.cuda.graph empties the cache on entry (measured
        # on an H200: without this the delta came out negative), and empty_cache never releases
        # the pool of a graph that is still alive, so what remains after capture is its cost.
        _return_cache(device)
        return torch.cuda.memory_reserved(device)

    def free_memory(self, device: torch.device) -> int:
        """Free device memory (what anything else could still allocate, with what other allocators give back:
        kernels/vram.py). Read right after ``memory``, which has just returned torch's cache: returning it a
        second time would only synchronize the device again."""
        return vram.free(device)


def _return_cache(device: torch.device) -> None:
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()


@dataclass
class CapturedGraph:
    graph: Any
    static: list                      # flat inputs: static tensor buffers, plain values as they were
    output: Any                       # the graph's output tensors (overwritten by each replay)
    bytes: int                        # memory delta of capture: static buffers + the graph's pool
    capture_s: float
    replays: int = 0

    def run(self, leaves: list):
        with torch.no_grad():
            for buf, leaf in zip(self.static, leaves):
                if isinstance(buf, torch.Tensor):
                    buf.copy_(leaf)
            self.graph.replay()
            self.replays += 1
            return pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, self.output)


def capture(fn: Callable, leaves: list, spec, device: torch.device, backend: GraphBackend,
            warmup: int = 2, factories_on_device: bool = False, keep: int = 0) -> CapturedGraph:
    """Capture ``fn(*unflattened inputs)`` on static copies of ``leaves``; run it once with replay.

    ``factories_on_device``: warm up and capture with ``device`` as torch's default device, so a
    forward that builds a tensor without naming a device (Wan's ``sinusoidal_embedding_1d`` calls
    ``torch.arange(half)`` and copies it over each call: a host-to-device copy, which a capture
    refuses) builds it on the device instead. The same integers, so the same results; the caller
    asks for it only after a plain capture failed, so models that capture as they are keep their
    host-side factories exactly as in eager runs.

    ``keep``: VRAM to leave free; where the warm-up's peak (and a quarter more) would not fit beside it,
    ``ShortOfMemory`` before capturing.
    """
    start = time.perf_counter()
    static = [leaf.detach().clone() if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
    static_bytes = sum(t.numel() * t.element_size() for t in static if isinstance(t, torch.Tensor))
    call = lambda: fn(pytree.tree_unflatten(static, spec))  # noqa: E731
    # Layers plan (on their first call at a signature) for replay, where no host cost is paid per layer
    # (kernels.dispatch.graph_plans); their eager plans stay for eager calls.
    factories = torch.device(device) if factories_on_device else contextlib.nullcontext()
    with graph_plans(), factories:
        need = backend.warmup(call, device, warmup)
        # Measured around the capture alone: warm-up growth of the shared cache is not this graph's.
        before = backend.memory(device)
        if need is not None:
            room = backend.free_memory(device)
            # A quarter more than the warm-up's peak: the graph's own pool cannot reuse blocks cached outside it,
            # and an allocation that fails inside a capture can leave torch's allocator unusable for the rest of
            # the process (an H200 with 2.5 GiB free, 2026-12-04: every later allocation failed). Erring towards
            # an eager step is cheap; a failed capture is not.
            if room - need - need // 4 < keep:
                raise ShortOfMemory(
                    f"capturing would need about {need / 2**20:.0f} MiB for the step's activations in the graph's "
                    f"own memory pool; {room / 2**20:.0f} MiB of VRAM is free and ComfyUI keeps "
                    f"{keep / 2**20:.0f} MiB for inference. Free VRAM (smaller images, other models unloaded) "
                    f"to replay graphs")
        try:
            graph, output = backend.capture(call, device)
        except Exception as e:  # noqa: BLE001 - the caller decides whether another try can help
            raise CaptureRefused(str(e)) from e
    captured = CapturedGraph(graph, static, output, static_bytes + backend.memory(device) - before, 0.0)
    captured.capture_s = time.perf_counter() - start
    return captured


@dataclass
class GraphCache:
    """At most ``capacity`` graphs, least recently used evicted first; keys that failed to capture."""
    capacity: int = 4
    graphs: "OrderedDict[Hashable, CapturedGraph]" = field(default_factory=OrderedDict)
    failed: dict = field(default_factory=dict)          # key -> why capture failed (eager for good)
    captures: int = 0
    evictions: int = 0

    def __post_init__(self):
        if self.capacity < 1:
            raise ValueError(f"graph cache capacity must be >= 1, got {self.capacity}")

    def get(self, key) -> CapturedGraph | None:
        graph = self.graphs.get(key)
        if graph is not None:
            self.graphs.move_to_end(key)
        return graph

    def put(self, key, graph: CapturedGraph) -> list[CapturedGraph]:
        """Store ``graph``; returns the graphs evicted to stay within capacity."""
        self.captures += 1
        self.graphs[key] = graph
        self.graphs.move_to_end(key)
        evicted = []
        while len(self.graphs) > self.capacity:
            evicted.append(self.graphs.popitem(last=False)[1])
        self.evictions += len(evicted)
        return evicted

    def clear(self) -> int:
        """Drop every graph (their memory pools go with them); returns how many. Failures stay:
        a capture fails for what the code does, not for which weights it reads."""
        n = len(self.graphs)
        self.graphs.clear()
        return n

    @property
    def bytes(self) -> int:
        return sum(g.bytes for g in self.graphs.values())
