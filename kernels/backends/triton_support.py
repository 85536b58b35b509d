"""Whether Triton can run here, and facts about the device its kernels are tuned for.

Kept apart from the kernel modules so that asking "can Triton run?" never imports a kernel (and
never fails when triton is missing). ``TRITON_INTERPRET=1`` makes Triton run its kernels on CPU
tensors through numpy; we treat that as a supported, if slow, device so that CI exercises the
very kernels that run on the GPU.
"""
from __future__ import annotations

import functools
import logging
from typing import Optional

import torch

from .. import switches

try:
    import triton  # noqa: F401
    _IMPORT_ERROR: Optional[str] = None
except Exception as exc:  # ImportError, or a broken install raising something else
    triton = None
    _IMPORT_ERROR = f"triton not importable ({type(exc).__name__}: {exc})"


def cdiv(a: int, b: int) -> int:
    """Ceiling division for host-side grids. Not ``triton.cdiv``: since Triton 3.5 that is a
    ConstexprFunction, whose call unwraps every argument (~1-2 us per grid on the GPU hosts' CPUs,
    paid on every launch)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (0 for 0, as Triton's), for host-side launch parameters. Not
    ``triton.next_power_of_2``, a ConstexprFunction like ``triton.cdiv`` (~2 us per call here, paid per launch
    by the GroupNorm and conv quantizer wrappers)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def interpreting() -> bool:
    """True when Triton runs kernels on CPU through its interpreter (read per call: tests set it)."""
    return switches.is_one("TRITON_INTERPRET")


def importable() -> bool:
    """Whether triton imported (the part of ``unavailable_reason`` that never changes in a process)."""
    return _IMPORT_ERROR is None


def unavailable_reason() -> Optional[str]:
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    if interpreting():
        return None
    if not torch.cuda.is_available():
        return "no CUDA device (set TRITON_INTERPRET=1 to run the Triton kernels on CPU for testing)"
    return None


def runs_on(t: torch.Tensor) -> bool:
    """Whether the Triton kernels run for tensors on t's device (a GPU, or the CPU interpreter in tests)."""
    if t.is_cuda:
        # A CUDA tensor means CUDA is there, so only Triton's import can fail: asked per fused op and deferred
        # input, the full check (environment read + torch.cuda.is_available, ~1.6 us) was host time per call.
        return importable()
    return interpreting() and unavailable_reason() is None


@functools.lru_cache(maxsize=None)
def capability(device_index: int = 0) -> tuple[int, int]:
    """(major, minor) SM version of a CUDA device; (0, 0) when there is none."""
    if not torch.cuda.is_available():
        return (0, 0)
    return torch.cuda.get_device_capability(device_index)


@functools.lru_cache(maxsize=None)
def num_sms(device_index: int = 0) -> int:
    if not torch.cuda.is_available():
        return 4
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def is_hopper() -> bool:
    return not interpreting() and capability()[0] == 9


def autotuning() -> bool:
    """OCTET_TRITON_AUTOTUNE=0 keeps only each kernel's first config: for correctness runs on a
    GPU, where compiling every config for every dtype/bias variant would dominate the run."""
    return switches.on("OCTET_TRITON_AUTOTUNE")


def tuning_bench(kernel_call, quantiles):
    """Autotune timing: median of ~25 ms of runs per config (Triton's default spends 125 ms).

    Triton flushes the L2 cache before each timed run by zeroing a 256 MiB buffer it allocates per tuning. On a
    card with less than that left (a model squeezed into a small card: SDXL's graph warm-up with 2.5 GiB free,
    H200 2026-12-04) that allocation failed the user's prompt. Then this times with a 1 MiB buffer instead, said
    once: the flush is partial, so every config of that tuning runs with a warmer cache alike."""
    from triton.testing import do_bench
    try:
        return do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)
    except torch.OutOfMemoryError:
        from .. import registry
        registry.log_once("tuning-small-flush", "Octet: not enough free VRAM for Triton's 256 MiB cache-flush "
                          "buffer while tuning a kernel: tuned with a 1 MiB one (timings slightly optimistic, "
                          "alike for every candidate). Free VRAM before the first prompt for exact tuning.",
                          level=logging.WARNING)
        driver = triton.runtime.driver.active
        small = small_flush_buffer()
        driver.get_empty_cache_for_benchmark = lambda: small     # the instance's, over the class's method
        try:
            return do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)
        finally:
            del driver.get_empty_cache_for_benchmark


def small_flush_buffer() -> torch.Tensor:
    return torch.empty(256 * 1024, dtype=torch.int32, device="cuda")


def tma_box_hook(lhs: str, rhs: str):
    """An autotune pre-hook for a GEMM whose operands ``lhs`` [M, K] and ``rhs`` [N, K] may be TMA
    descriptors: their box must match the chosen config's tile, set before each launch."""
    def hook(nargs):
        if hasattr(nargs[lhs], "block_shape"):   # a TensorDescriptor (pointer operands need nothing)
            nargs[lhs].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_K"]]
            nargs[rhs].block_shape = [nargs["BLOCK_N"], nargs["BLOCK_K"]]
    return hook


def survivors(configs: list, kept: list) -> list:
    """What a kernel's early prune hands the autotuner: the configs that fit this call (at least the one
    with the shortest tile), and only the first of them under OCTET_TRITON_AUTOTUNE=0. Read per new
    tuning key, not frozen at import, so a process can switch it."""
    kept = kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"])]
    return kept if autotuning() else kept[:1]
