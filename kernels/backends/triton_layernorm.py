"""A LayerNorm without affine and the block's modulation after it, ``addcmul(shift, layer_norm(x), mult)``, in one
pass: the math shared by the float kernel here and the INT8 quantizer that applies it (triton_quant.NormRowQuantizer).

Why the float kernel: Wan's attention block feeds its self-attention ``addcmul(e0, norm1(x), 1 + e1)``, and its
1536-wide q/k/v projections stay bf16 (INT8 does not pay at K = N = 1536 once its activation pass is paid), so no
INT8 quantizer can take the two passes in. The host runs a LayerNorm pass (read x, write y) and an addcmul pass (read
y, write the modulated rows): on an H200 at Wan 2.1 1.3B's 14,040 tokens, 46 + 67 us of every block (3.4 ms of a
~130 ms step; docs/bench/e2e_profile_wan_h200_2026-12-05_twentythird_comfy029.json). One kernel reads x once and
writes the modulated rows once (octet/float_fusions.py ``NormModulateForward``, octet/deferred.py PendingNorm).

Rows are normalised in fp32 and modulated in fp32, rounded once to x's dtype (the host rounds the LayerNorm's output,
then the modulation's: the two differ in the last bit of the activation dtype). Reference: torch_ref.norm_modulate.
``mult`` / ``shift`` are one row per batch entry (torch_ref.modulation_per_batch; stride 0 for one shared row).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import torch_ref
from . import triton_launch, triton_support


@triton.jit
def norm_modulate_rows(x_ptr, mult_ptr, shift_ptr, M, K, L, stride_xm, stride_mb, stride_sb, eps,
                       HAS_MULT: tl.constexpr, HAS_SHIFT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """This program's BLOCK_M rows of addcmul(shift, layer_norm(x), mult) in fp32 (whole rows: BLOCK_K >= K; the mean
    and the variance need the row twice), zero outside the masks, with (rows, offs, mask_m, mask_k) for the caller's
    store. A row's batch entry is row // L."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs = tl.arange(0, BLOCK_K)
    mask_m, mask_k = rows < M, offs < K
    mask = mask_m[:, None] & mask_k[None, :]
    v = tl.load(x_ptr + rows[:, None] * stride_xm + offs[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(v, axis=1) / K
    d = tl.where(mask, v - mean[:, None], 0.0)
    var = tl.sum(d * d, axis=1) / K
    y = d * (1.0 / tl.sqrt_rn(var + eps))[:, None]
    batch = rows // L
    if HAS_MULT:
        y = y * tl.load(mult_ptr + batch[:, None] * stride_mb + offs[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_SHIFT:
        y = y + tl.load(shift_ptr + batch[:, None] * stride_sb + offs[None, :], mask=mask, other=0.0).to(tl.float32)
    # Zero outside the masks already (d is, and the loads give 0 there), without a select a thread per element (32
    # of the norm quantizer's instructions a thread at 3072 wide; a row whose rstd is inf is NaN in every lane alike)
    return y, rows, offs, mask_m, mask_k


@triton.jit
def _norm_modulate_kernel(x_ptr, mult_ptr, shift_ptr, o_ptr, M, K, L, stride_xm, stride_mb, stride_sb, eps,
                          HAS_MULT: tl.constexpr, HAS_SHIFT: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_K: tl.constexpr):
    y, rows, offs, mask_m, mask_k = norm_modulate_rows(x_ptr, mult_ptr, shift_ptr, M, K, L, stride_xm, stride_mb,
                                                       stride_sb, eps, HAS_MULT, HAS_SHIFT, BLOCK_M, BLOCK_K)
    tl.store(o_ptr + rows[:, None] * K + offs[None, :], y.to(o_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_k[None, :])


# One tile holds whole rows (the mean and the variance read the row twice): wider rows take the host's ops.
MAX_K = 8192


def config_for(k: int) -> tuple[int, int]:
    """(rows per program, warps) for rows of k: a few short rows per program keep more loads in flight than one
    (the one-row norm quantizer ran at 0.85 TB/s at K = 1536 on an H200, 2026-12-05); not yet swept on a GPU
    (bench/deferred_kernels.py --only wan --sweep)."""
    block_k = triton_support.next_power_of_2(k)
    if block_k <= 1024:
        return 4, 4
    if block_k <= 2048:
        return 2, 4
    return 1, 8 if block_k <= 4096 else 16


def batch_rows(t: torch.Tensor | None, x: torch.Tensor) -> tuple[torch.Tensor | None, int] | None:
    """mult/shift as (tensor, stride between batch entries) if the kernels can read it: a modulation shape
    (torch_ref.modulation_per_batch) with unit column stride in x's dtype; else None."""
    if t is None:
        return None, 0
    if not torch_ref.modulation_per_batch(t, x) or t.stride(-1) != 1 or t.dtype != x.dtype:
        return None
    return t, (t.stride(0) if x.dim() == 3 and t.dim() == 3 and t.shape[0] > 1 else 0)


def fits(x: torch.Tensor) -> bool:
    """Rows the kernels read in place: [M, K] or [B, L, K], unit column stride, K whole in one tile, 32-bit sizes."""
    return (x.dim() in (2, 3) and 0 < x.shape[-1] <= MAX_K and x.stride(-1) == 1 and x.numel() < 2**31
            and x.dtype in (torch.bfloat16, torch.float16, torch.float32))


class NormModulate:
    """One call site's ``addcmul(shift, layer_norm(x), mult)`` (mult / shift may be None) in one pass. Calls go
    through triton_launch's launcher (Triton's dispatch at a key's first call, its C launcher after): the sites are
    Wan's blocks, whose steps are GPU-bound, so no bound call is kept."""

    def __init__(self, config: tuple | None = None):
        self.config = config

    @staticmethod
    def takes(x: torch.Tensor, mult: torch.Tensor | None = None, shift: torch.Tensor | None = None) -> bool:
        return fits(x) and batch_rows(mult, x) is not None and batch_rows(shift, x) is not None

    def __call__(self, x: torch.Tensor, eps: float, mult: torch.Tensor | None = None,
                 shift: torch.Tensor | None = None) -> torch.Tensor | None:
        """The modulated rows, x's shape and dtype (contiguous), or None where the kernel does not take them."""
        if not self.takes(x, mult, shift):
            return None
        (mult, smb), (shift, ssb) = batch_rows(mult, x), batch_rows(shift, x)
        k = x.shape[-1]
        rows = x.reshape(-1, k)     # a view where the leading dims merge (fits: unit column stride)
        m = rows.shape[0]
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        if m == 0:
            return out
        block_m, warps = self.config or config_for(k)
        block_k = triton_support.next_power_of_2(k)
        tokens = x.shape[1] if x.dim() == 3 else m
        sx = rows.stride(0)
        # The launcher is the process's one for this kernel: the key holds every compile-time choice.
        key = (x.dtype, block_m, block_k, warps, mult is not None, shift is not None) + triton_launch.facts(
            rows, out, sx, tokens, m, k, smb, ssb, *(t for t in (mult, shift) if t is not None))
        flags = dict(HAS_MULT=mult is not None, HAS_SHIFT=shift is not None, BLOCK_M=block_m, BLOCK_K=block_k,
                     num_warps=warps)
        grid = (triton_support.cdiv(m, block_m),)
        triton_launch.shared(_norm_modulate_kernel, "norm_modulate")(
            key, lambda meta: grid,
            lambda meta: (rows, mult if mult is not None else rows, shift if shift is not None else rows, out, m, k,
                          tokens, sx, smb, ssb, float(eps)), flags)
        return out
