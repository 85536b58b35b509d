"""GEGLU's gate in one pass: ``x * gelu(gate)`` from the two halves of its projection's output.

Why: an SD/SDXL transformer block's feed-forward (comfy.ldm.modules.attention.GEGLU) runs
``x, gate = proj(h).chunk(2, -1); x * F.gelu(gate)``: a GELU pass over the gate half (written out) and a
multiply pass reading both, ~2.8 ms of GPU time in an SDXL step at 1024² (70 blocks; H200 profile,
docs/bench/e2e_h200_2026-12-02_profile_sd35_sdxl.json). One kernel reads the projection once and writes
the product once.

Numerics follow the host's ops (reference: ``torch_ref.geglu``): the exact (erf) GELU in fp32, rounded to the
activation dtype (the host stores it), then the product in fp32 of the two rounded operands, rounded once.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_launch, triton_support


@triton.jit
def _geglu_kernel(h_ptr, o_ptr, total, D, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < total
    row = idx // D
    col = idx - row * D
    src = row * (2 * D) + col
    x = tl.load(h_ptr + src, mask=mask, other=0.0)
    gate = tl.load(h_ptr + src + D, mask=mask, other=0.0).to(tl.float32)
    g = (0.5 * gate * (1.0 + tl.math.erf(gate * 0.7071067811865476))).to(x.dtype)
    tl.store(o_ptr + idx, (x.to(tl.float32) * g.to(tl.float32)).to(o_ptr.dtype.element_ty), mask=mask)


# (BLOCK, num_warps)
CONFIG = (1024, 4)


def takes(h: torch.Tensor) -> bool:
    """Whether the kernel can read ``h`` [..., 2D] (contiguous, a float dtype, fewer than 2**31 elements)."""
    return (h.dim() >= 1 and h.is_contiguous() and h.dtype in (torch.bfloat16, torch.float16, torch.float32)
            and h.shape[-1] % 2 == 0 and 0 < h.numel() < 2**31)


def geglu(h: torch.Tensor, config: tuple | None = None) -> torch.Tensor:
    """``x * F.gelu(gate)`` for ``x, gate = h.chunk(2, -1)``; ``h`` as ``takes`` accepts it. Output contiguous,
    h's dtype, shape [..., D]."""
    block, warps = config or CONFIG
    d = h.shape[-1] // 2
    out = torch.empty(h.shape[:-1] + (d,), dtype=h.dtype, device=h.device)
    total = out.numel()
    grid = (triton_support.cdiv(total, block),)
    key = (h.dtype, block, warps) + triton_launch.facts(h, out, total, d)
    triton_launch.shared(_geglu_kernel, "geglu")(key, lambda meta: grid, lambda meta: (h, out, total, d),
                                                 dict(BLOCK=block, num_warps=warps))
    return out
