"""The VRAM Octet may take for itself, and the one reserve it leaves free.

Octet allocates beside the host's own memory planning: the speed goal's float copies and fused q/k/v weights
(made at a layer's first call), INT8 layers loaded whole under dynamic VRAM, a CUDA graph's private pool. Each
first asks ``leaves_reserve``: what is free now (``free``) minus its bytes must leave ``reserve`` free, the memory
ComfyUI keeps for the prompt's inference (activations, the VAE decode). Without that rule the speed goal's copies
ran a card out of memory where the bf16 model, streamed by the host, ran (SDXL, H200 with 4.5 GiB left free,
2026-12-04).

kernels/ stays free of host imports: the nodes register what only the host knows, ``HOST_RESERVE`` (ComfyUI's
reserve; for the prompt being loaded, its estimate of the activations: nodes/host_compat.py) and ``RECLAIMABLE``
(memory comfy-aimdo gives back when an allocation needs it: nodes/dynamic_vram.py).
"""
from __future__ import annotations

import logging
import os

import torch

# Without a host (a script on octet.quantize_): ComfyUI's own default, 0.8 GiB of minimum inference memory plus its
# 0.4 GiB extra reserve on Linux. OCTET_VRAM_RESERVE_MIB raises the floor under whatever the host asks.
DEFAULT_RESERVE_BYTES = int(1228.8 * 2**20)


def floor_from_env(text) -> int:
    """OCTET_VRAM_RESERVE_MIB in bytes; a value that is not a non-negative number is said and ignored (the pack
    still loads)."""
    if text is None or not text.strip():
        return 0
    try:
        mib = float(text)
    except ValueError:
        mib = -1.0
    if not mib >= 0 or mib == float("inf"):
        logging.getLogger("octet").warning(
            "Octet: OCTET_VRAM_RESERVE_MIB=%r is not a number of MiB (e.g. 2048); ignored, ComfyUI's own reserve "
            "applies. Set it to the VRAM to keep free beside Octet's own allocations, or unset it.", text)
        return 0
    return int(mib * 2**20)


FLOOR_BYTES = floor_from_env(os.environ.get("OCTET_VRAM_RESERVE_MIB"))

# Functions device -> bytes, registered by the nodes.
HOST_RESERVE: list = []     # the VRAM the host keeps free for inference now
RECLAIMABLE: list = []      # memory other allocators hand back when an allocation needs it


def reserve(device: torch.device) -> int:
    """Bytes to leave free on ``device``: the host's reserve (its default without a host), at least the floor."""
    asked = [f(device) for f in HOST_RESERVE] or [DEFAULT_RESERVE_BYTES]
    return max(FLOOR_BYTES, *asked)


def free(device: torch.device) -> int:
    """Bytes a new allocation on ``device`` can get: the driver's free memory, torch's cached free blocks (as
    ComfyUI's get_free_memory counts them) and what RECLAIMABLE's allocators would give back."""
    driver, _ = torch.cuda.mem_get_info(device)
    stats = torch.cuda.memory_stats(device)
    cached = stats.get("reserved_bytes.all.current", 0) - stats.get("active_bytes.all.current", 0)
    return driver + cached + sum(f(device) for f in RECLAIMABLE)


def leaves_reserve(device: torch.device, nbytes: int) -> bool:
    """Whether ``nbytes`` more on ``device`` leave the reserve free (no limit off the GPU)."""
    return device.type != "cuda" or free(device) - nbytes >= reserve(device)
