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
    h's dtype, shape [..., D]. One-shot; call sites keep a ``Geglu``."""
    return Geglu(config).run(h)


class Geglu:
    """One call site's GEGLU gate: its launch, and from the second call at an input's (shape, dtype, alignment) a
    bound call (the learned C launcher with grid and arguments worked out once; triton_groupnorm.GroupNorm says
    why: an eager SDXL step makes 70 of these calls, host-bound)."""

    def __init__(self, config: tuple | None = None):
        self.config = config or CONFIG
        self._calls = triton_launch.BoundCalls()   # key -> bound call, False (``run``), DECLINED (host ops)

    def __call__(self, h: torch.Tensor):
        """``run(h)``, or None where the kernel does not take ``h`` (the caller runs the host's ops)."""
        key = (h.shape, h.dtype, h.is_contiguous(), h.data_ptr() % 16 == 0)
        return self._calls.call(key, self.run, self._bind, (h,), takes)

    def _key(self, h, out_aligned: bool, total: int, d: int) -> tuple:
        block, warps = self.config
        return (h.dtype, block, warps, h.data_ptr() % 16 == 0, out_aligned) + triton_launch.facts(total, d)

    def run(self, h: torch.Tensor) -> torch.Tensor:
        """The general path: the launch through triton_launch (Triton's dispatch at a key's first call)."""
        block, warps = self.config
        d = h.shape[-1] // 2
        out = torch.empty(h.shape[:-1] + (d,), dtype=h.dtype, device=h.device)
        total = out.numel()
        grid = (triton_support.cdiv(total, block),)
        triton_launch.shared(_geglu_kernel, "geglu")(self._key(h, out.data_ptr() % 16 == 0, total, d),
                                                     lambda meta: grid, lambda meta: (h, out, total, d),
                                                     dict(BLOCK=block, num_warps=warps))
        return out

    def _bind(self, key, h) -> None:
        """After ``run`` at a new key: the bound call there, if the launch was learned with a C launcher on the
        current device (else ``run`` stays)."""
        if not self._calls.open(key) or not h.is_contiguous():
            return
        launcher = triton_launch.shared(_geglu_kernel, "geglu")
        d = h.shape[-1] // 2
        shape = h.shape[:-1] + (d,)
        total = h.numel() // 2
        record = launcher.learned(self._key(h, True, total, d))   # fresh allocations start 16-byte aligned
        if record is None:
            return
        device = launcher.current_device()
        if device != h.get_device():
            return
        c_launch, current, stream_of = record.c_launch, launcher.current_device, launcher.stream
        gx, dtype, where = triton_support.cdiv(total, self.config[0]), h.dtype, h.device

        def call(h):
            if current() != device:   # the compiled kernel belongs to the device it was made on
                return None
            out = torch.empty(shape, dtype=dtype, device=where)
            c_launch(gx, 1, 1, stream_of(device), (h, out, total, d))
            return out
        self._calls[key] = call
