"""Memory an INT8 layer keeps past one call, allocated outside torch.compile's CUDA-graph pool.

torch.compile with CUDA graphs (``mode="reduce-overhead"``, or ComfyUI's TorchCompileModel with backend
``cudagraphs``) runs each new graph once eagerly before recording it. During that warm-up run the caching
allocator routes every allocation of this thread to the graph trees' private pool, and afterwards the
trees require each live tensor in that pool to be one of the graph's outputs. What a layer builds at its
first call and keeps (a plan's float weight copy on the speed goal, its static scales on the device, the
per-stream scratch for a stream it has not run on) stayed alive in the pool and the compile failed:
"Detected 24 tensor(s) in the cudagraph pool not tracked as outputs" (Flux-dev, H100, 2026-12-06).

``outside(device)`` lets that memory step out of the pool for its duration, the way PyTorch's own CUDA
generator state does (pytorch#173421): end this thread's routing to the pool and drop the reference that
routing held (as the trees' own exit from a run does), allocate, route again (which takes a new reference).
It does nothing outside a warm-up run (eager calls, a compiled graph without CUDA graphs) and nothing
while a stream is capturing: memory allocated in a capture belongs to that graph. Only cold paths call
it (a plan built, a scratch buffer grown), so its lookups cost no per-call host time.
"""
from __future__ import annotations

import contextlib
import sys

import torch

_end = getattr(torch._C, "_cuda_endAllocateToPool", None)
_begin = getattr(torch._C, "_cuda_beginAllocateCurrentThreadToPool", None)
_release = getattr(torch._C, "_cuda_releasePool", None)


def _warmup_pool(index: int):
    """The pool id torch.compile's graph trees are warming a graph up into on device ``index``, else None."""
    trees = sys.modules.get("torch._inductor.cudagraph_trees")
    if trees is None:          # never imported: no graph trees in this process
        return None
    manager = trees.get_manager(index, create_if_none_exists=False)
    if manager is None or not manager.in_warmup:
        return None
    return manager.cuda_graphs_thread_pool


@contextlib.contextmanager
def outside(device: torch.device):
    """Allocations in this block go to the caching allocator's default pool, even inside a graph trees'
    warm-up run on ``device``."""
    pool = index = None
    if device.type == "cuda" and None not in (_end, _begin, _release) \
            and not torch.cuda.is_current_stream_capturing():
        index = device.index if device.index is not None else torch.cuda.current_device()
        pool = _warmup_pool(index)
        if pool is not None:
            try:
                _end(index, pool)
            except RuntimeError:    # the manager is in warm-up but this thread is not routed (its run is over)
                pool = None
            else:
                _release(index, pool)   # the trees' graph still holds the pool: this frees nothing
    try:
        yield
    finally:
        if pool is not None:
            _begin(index, pool)
