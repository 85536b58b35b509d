"""Per-stream scratch for an INT8 layer's quantized activation (its int8 codes and fp32 row scales) and for
weight-only's dequantized float weight.

Why: each ``torch.empty`` on CUDA costs ~4 us of host time on the GPU hosts (bench/launch_cost.py),
and an eager dynamic W8A8 layer made three per call (codes, scales, output), a tenth of its host
time. The codes and scales live only from the quantization kernel to the GEMM launched right after
it on the same stream, so one buffer per (device, stream, thread) can serve every layer: kernels on
one stream run in issue order, so the next layer's quantization cannot overwrite codes the previous
GEMM still reads. The views for each (M, K) are kept, so a call costs a dictionary lookup. Weight-only at large M
(triton_w8a16.W8A16Linear) has the same pattern: its [N, K] float weight lives from the dequantize kernel
to the cuBLAS GEMM launched right after it on the same stream, and a fresh one per call was ~2-4 us of its
~36 us of host time (bench/overhead.py, SDXL's M=4096 shapes).

Not used (fresh allocations, as before):
  * while the stream is being captured into a CUDA graph: the graph would keep the buffer's address,
    and a later growth of the buffer would free memory the graph still uses;
  * above ``LIMIT_BYTES`` of codes (64 MiB), so that what stays allocated after the model is unloaded is
    bounded. Every layer of SDXL, SD3.5 and Flux at 1024² fits (Flux's largest, a double block's fc2 at
    4096 x 12288, is 48 MiB): the first limit, 8 MiB, left Flux's M=4096 layers allocating three tensors
    per call (49-71 us of host time per layer, bench/overhead.py, vs 37-46 at M=16), and the caching
    allocator keeps blocks of that size reserved anyway;
  * by any caller that keeps the codes past its own GEMM (only ``_W8A8Linear``'s plan asks for it), and for
    a float weight autograd would save for backward (the caller asks only when its input needs no grad).
"""
from __future__ import annotations

import os
import threading

import torch

from .. import graph_pool

LIMIT_BYTES = 64 << 20
ENABLED = True


def read_environment() -> None:
    """ENABLED from OCTET_SCRATCH: at import, and again where a bench changes the variable in-process (read
    once, not per call: the lookup would be host time on every INT8 layer)."""
    global ENABLED
    ENABLED = os.environ.get("OCTET_SCRATCH", "1") != "0"


read_environment()


class _Buffer:
    __slots__ = ("codes", "scales", "views")

    def __init__(self):
        self.codes = self.scales = None
        self.views: dict = {}


_buffers: dict = {}
_MAX_VIEWS = 64   # (M, K) pairs kept per buffer; a video model's changing lengths would grow it forever
_MAX_BUFFERS = 16  # (device, stream, thread) keys; ComfyUI samples on one long-lived thread and stream
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


# torch.cuda.is_current_stream_capturing's C function, without the Python shim (every INT8 layer call asks).
_capturing = getattr(torch._C, "_cuda_isCurrentStreamCapturing", None) or torch.cuda.is_current_stream_capturing


def _new_buffer(table: dict, key) -> _Buffer:
    """A fresh buffer for ``key`` in ``table`` (a lookup miss; hits stay inline, they are per call)."""
    if len(table) >= _MAX_BUFFERS:   # threads or streams that came and went: start over
        table.clear()
    buf = table[key] = _Buffer()
    return buf


def _keep(buf: _Buffer, shape: tuple, views):
    """Remember ``views`` for ``shape`` in ``buf``, at most ``_MAX_VIEWS`` of them."""
    if len(buf.views) >= _MAX_VIEWS:
        buf.views.clear()
    buf.views[shape] = views
    return views


def _allocate(size: int, rows: int, device: torch.device):
    # Outside a CUDA-graph warm-up's pool: the buffer outlives the graph's run (kernels/graph_pool.py).
    with graph_pool.outside(device):
        return torch.empty(size, dtype=torch.int8, device=device), torch.empty(rows, dtype=torch.float32,
                                                                                device=device)


def codes_and_scales(m: int, k: int, device: torch.device):
    """(int8 [M, K], fp32 [M]) from this stream's scratch, or None where fresh tensors are needed."""
    if device.type != "cuda" or _raw_stream is None:
        return None
    index = device.index
    return on_stream(m, k, index, _raw_stream(index))


def on_stream(m: int, k: int, index: int, stream: int):
    """``codes_and_scales`` for CUDA device ``index`` whose current stream is ``stream`` (its raw handle, which
    a caller launching on it has already asked for)."""
    if not ENABLED or m * k > LIMIT_BYTES or _capturing():
        return None
    key = (index, stream, threading.get_ident())
    buf = _buffers.get(key) or _new_buffer(_buffers, key)
    views = buf.views.get((m, k))
    if views is None:
        if buf.codes is None or buf.codes.numel() < m * k or buf.scales.numel() < m:
            # Grow (never shrink) to the larger of the old size and this request; the views of the old
            # buffer go with it. The old storage returns to the caching allocator in stream order.
            size = max(m * k, 0 if buf.codes is None else buf.codes.numel())
            rows = max(m, 0 if buf.scales is None else buf.scales.numel())
            buf.codes, buf.scales = _allocate(size, rows, torch.device("cuda", index))
            buf.views.clear()
        views = _keep(buf, (m, k), (buf.codes[:m * k].view(m, k), buf.scales[:m]))
    return views


_weights: dict = {}   # (device, stream, thread, dtype) -> _Buffer whose codes hold float weights


def _allocate_weight(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    with graph_pool.outside(device):
        return torch.empty(numel, dtype=dtype, device=device)


def weight_on_stream(n: int, k: int, dtype: torch.dtype, where: torch.device, stream: int):
    """A [N, K] tensor of ``dtype`` on ``where`` from the scratch of ``where``'s current stream ``stream``, for a
    weight dequantized right before the GEMM that reads it (same stream); None where a fresh tensor is needed:
    while capturing, above ``LIMIT_BYTES``, scratch off."""
    numel = n * k
    if not ENABLED or numel * dtype.itemsize > LIMIT_BYTES or _capturing():
        return None
    key = (where, stream, threading.get_ident(), dtype)
    buf = _weights.get(key) or _new_buffer(_weights, key)
    view = buf.views.get((n, k))
    if view is None:
        if buf.codes is None or buf.codes.numel() < numel:   # grow, never shrink (as codes_and_scales)
            buf.codes = _allocate_weight(max(numel, 0 if buf.codes is None else buf.codes.numel()), dtype, where)
            buf.views.clear()
        view = _keep(buf, (n, k), buf.codes[:numel].view(n, k))
    return view


def release() -> None:
    """Drop every scratch buffer (tests; a host freeing all memory may call it too)."""
    _buffers.clear()
    _weights.clear()
