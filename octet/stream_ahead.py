"""Streamed INT8 layers' weights copied to the GPU ahead of their calls, on a copy stream.

A layer that does not fit on the GPU (nodes/dynamic_vram.py; the legacy patcher's lowvram) keeps its int8 weight in
pinned RAM and copies it over at each call (``QuantLayer.forward``). Copied on the compute stream, each copy waits
for the kernels before it and the layer's GEMM waits for the copy: Flux-dev with 8 GiB free streamed 4.48 GiB per
step and took 248 ms/step against 130 with 12 GiB free (0.49 GiB streamed; H200, 2026-12-04). The copy engine runs
beside the SMs, so the copies of the streamed layers expected next are made on a side stream, and a layer's call
only waits for its own.

Which layer comes next is learnt, not planned: each streamed call records itself as the successor of the streamed
call before it. A prompt's first step learns the order and later steps (and prompts) follow it; a call that was
not expected (another model, a changed order) drops the copies made ahead and copies its own as before.

How far ahead: ``AHEAD`` layers, and no more than ``AHEAD_BYTES`` beyond the first: that much memory beyond what
the current call holds. A copy starts once the GPU has reached the call that made it (the work the compute stream
queued before it), where the copy in the call would have started, but no longer holds up that call's kernels. One
ahead, measured (H200, ComfyUI 0.29 dynamic VRAM, 2026-12-04): Flux-dev with 8 GiB free 228 ms/step against 248
copying in the call, SDXL with 2.5 GiB free 165 against 183. Flux computes a double block's two modulations back to
back, so the second one's copy, made at the first one's call, has almost nothing to overlap with; two ahead would
start it a call earlier (``bench/low_vram.py --variants octet_ahead2``; not measured yet). The copies made ahead hold
their memory until their calls (the last ones of a step: into the next step, or the next prompt) unless ``drop``
gives it back sooner (a load or an unload of a model, nodes/dynamic_vram.py).

Not while a CUDA graph is planned or captured: a graph records its own copies (the graph step does not capture
streamed models anyway, nodes/graph_step.py).
"""
from __future__ import annotations

import collections
import logging
import weakref
from dataclasses import dataclass
from typing import Optional

import torch

from ..kernels.dispatch import planning_for_graph
from ..kernels.operands import Int8Operands
from ..kernels.registry import log_once

AHEAD = 1
AHEAD_BYTES = 256 << 20
# A copy made ahead is allocated on the compute stream (where it is used and freed) and only copied on the copy
# stream. Allocated on the copy stream (as first built), its block came back only to that stream's share of the
# caching allocator: Flux-dev at 8 GiB free 153 vs 141 ms/step, 10 allocation retries vs 1 and 104 vs 29 cudaMallocs
# in two prompts (SDXL at 2.5 GiB: 132 vs 131; H100 2026-12-06, bench/low_vram.py).


@dataclass
class _Ahead:
    layer: weakref.ref
    device: torch.device
    source: tuple               # the layer's (weight tensor, version) when copied: a LoRA merge since voids it
    operands: Int8Operands
    ready: object               # a CUDA event recorded after the copies, on the copy stream
    bytes: int


_successor: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()    # layer -> weakref to the one after it
_last: Optional[weakref.ref] = None
_pending: "collections.deque[_Ahead]" = collections.deque()   # in the order their calls are expected
_streams: dict = {}
_no_room: set = set()       # devices where a copy ahead ran out of memory, until the next ``drop``
stats = {"ahead": 0, "missed": 0}       # calls that found their copy made ahead / copies made ahead and dropped


def operands(layer, device: torch.device) -> Int8Operands:
    """This streamed call's operands on ``device``: the copy made ahead if it is this layer's (the compute
    stream waits for it), else copied now; and the copies of the streamed layers expected next are started."""
    global _last
    usable = _streams_usable(device)
    ops = _take(layer, device, usable)
    if ops is None:
        ops = layer.operands(device)
    last = None if _last is None else _last()
    if last is not None and last is not layer:
        _successor[last] = weakref.ref(layer)
    _last = weakref.ref(layer)
    if usable and device not in _no_room:
        _top_up(layer, device)
    return ops


def drop() -> None:
    """Forget the copies made ahead (their memory goes back once they are done) and try again where one found no
    room; the learnt order stays."""
    _forget()
    _no_room.clear()


def _forget() -> None:
    stats["missed"] += len(_pending)
    # Their memory goes back to the compute stream's pool: the compute stream must not reuse it for a new tensor
    # before the copy into it is done.
    for ahead in _pending:
        _after_copy(ahead.ready, ahead.device)
    _pending.clear()


def _take(layer, device: torch.device, usable: bool) -> Optional[Int8Operands]:
    if not _pending:
        return None
    ahead = _pending[0]
    weight, version = layer.weight_state()
    if not usable or ahead.layer() is not layer or ahead.device != device \
            or ahead.source[0] is not weight or ahead.source[1] != version:
        _forget()       # another order (or a weight changed since): this call copies its own
        return None
    _pending.popleft()
    _after_copy(ahead.ready, device)
    stats["ahead"] += 1
    return ahead.operands


def _top_up(layer, device: torch.device) -> None:
    """Copy the layers expected after ``layer`` until ``AHEAD`` are ahead (or ``AHEAD_BYTES`` beyond the first)."""
    tail = _pending[-1].layer() if _pending else layer
    queued = sum(a.bytes for a in _pending)
    while tail is not None and len(_pending) < AHEAD:
        following = _successor.get(tail)
        following = None if following is None else following()
        if following is None or following is layer or any(a.layer() is following for a in _pending) \
                or not _streamed_from_pinned_ram(following):
            return
        size = following._parameters["weight"].nbytes
        if _pending and queued + size > AHEAD_BYTES:
            return
        try:
            ops, ready = _launch(following, device)
        except torch.OutOfMemoryError:
            # The copy made ahead is memory beyond what the call needs: without room for it, copy in the call (as
            # before) rather than fail a call that fits; and not again until the next load or unload (``drop``), as
            # each failed allocation has torch synchronize and give its cache back.
            _no_room.add(device)
            log_once("stream-ahead-oom", f"Octet: no free VRAM to copy a streamed layer ({size / 2**20:.0f} MiB) "
                     f"ahead of its call; such layers are copied in their calls (slower). Free VRAM to overlap the "
                     f"copies with the GPU's work.", logging.WARNING)
            return
        _pending.append(_Ahead(weakref.ref(following), device, following.weight_state(), ops, ready, size))
        queued += size
        tail = following


def _streams_usable(device: torch.device) -> bool:
    """A GPU call outside CUDA graph work: a graph records its own copies, and an event recorded outside a capture
    cannot be waited for inside it."""
    return device.type == "cuda" and not planning_for_graph() and not torch.cuda.is_current_stream_capturing()


def _streamed_from_pinned_ram(layer) -> bool:
    """Still streamed, from pinned RAM (from pageable RAM the copy would hold up the host), without per-call patches
    (those compute in float from the layer's own tensors)."""
    w = layer._parameters["weight"]
    return w.device.type == "cpu" and w.is_pinned() and not layer.weight_function and not layer.bias_function


# The two points that touch CUDA's streams (tests substitute CPU stand-ins).
def _launch(layer, device: torch.device) -> tuple:
    """(operands, event): ``layer``'s operands copied on the copy stream, the event recorded after them."""
    compute = torch.cuda.current_stream(device)
    stream = _streams.get(device)
    if stream is None:
        stream = _streams[device] = torch.cuda.Stream(device)
    # After what the compute stream has queued so far, as the copy in the call was: the operands may read tensors the
    # host's load put on the GPU on that stream (the scales: no copy, but read if a conversion were needed), and a
    # block the compute stream freed and hands to a copy here may still be read by its kernels queued so far.
    stream.wait_stream(compute)
    ops = layer.operands(device, copy_on=lambda: torch.cuda.stream(stream))
    ready = torch.cuda.Event()
    ready.record(stream)
    return ops, ready


def _after_copy(ready, device: torch.device) -> None:
    """The compute stream's later work waits for the copy recorded by ``ready``."""
    torch.cuda.current_stream(device).wait_event(ready)
