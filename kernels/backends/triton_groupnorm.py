"""GroupNorm (and the SiLU after it) in two launches over an NCHW tensor.

Why: a UNet's step spends a large share of its GPU time here, and the host's path is slow at these
shapes: SDXL at 1024² (H200, docs/bench/e2e_h200_2026-12-02_profile_sd35_sdxl.json) runs 46 GroupNorms at
67 us each (3.1 ms of a ~24 ms step), most followed by a separate SiLU pass. PyTorch's kernel reduces each
(sample, group) in one block of threads, so at batch 1 only 32 blocks read a 10 MB tensor. Here the
statistics pass splits each group into CHUNK-element pieces (hundreds of programs), and the apply pass
normalises, applies the affine and, in a ResBlock, the SiLU in one read and one write.

Layout: in a contiguous [N, C, *spatial] tensor one group of C/G channels is one contiguous run of
S = C/G * prod(spatial) elements, group r = n * G + g starting at r * S. Statistics are sums of (x - x0)
and (x - x0)² in fp32 with x0 the group's first element (a shift that keeps E[x²] - E[x]² from cancelling
when a group's mean is large against its spread), per chunk; the apply pass adds up its group's chunks.

Numerics follow the host's ops (reference: ``torch_ref.group_norm_silu``): the normalisation and affine in
fp32, rounded to the activation dtype (the host stores the GroupNorm output), the SiLU in fp32 on that,
rounded once more.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_launch, triton_support


@triton.jit
def _gn_stats_kernel(x_ptr, part_ptr, S, SPLIT, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    r = tl.program_id(0)
    j = tl.program_id(1)
    base = r.to(tl.int64) * S
    shift = tl.load(x_ptr + base).to(tl.float32)
    acc_s = tl.zeros((BLOCK,), dtype=tl.float32)
    acc_q = tl.zeros((BLOCK,), dtype=tl.float32)
    for off in tl.static_range(0, CHUNK, BLOCK):
        idx = j * CHUNK + off + tl.arange(0, BLOCK)
        mask = idx < S
        v = tl.load(x_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
        d = tl.where(mask, v - shift, 0.0)
        acc_s += d
        acc_q += d * d
    out = part_ptr + (r * SPLIT + j) * 2
    tl.store(out, tl.sum(acc_s, axis=0))
    tl.store(out + 1, tl.sum(acc_q, axis=0))


@triton.jit
def _gn_apply_kernel(x_ptr, w_ptr, b_ptr, y_ptr, part_ptr, S, HW, CG, G, SPLIT, eps,
                     BLOCK: tl.constexpr, CHUNK: tl.constexpr, SPLIT_P: tl.constexpr,
                     AFFINE: tl.constexpr, SILU: tl.constexpr):
    r = tl.program_id(0)
    j = tl.program_id(1)
    base = r.to(tl.int64) * S
    parts = tl.arange(0, SPLIT_P)
    pmask = parts < SPLIT
    sums = tl.load(part_ptr + (r * SPLIT + parts) * 2, mask=pmask, other=0.0)
    squares = tl.load(part_ptr + (r * SPLIT + parts) * 2 + 1, mask=pmask, other=0.0)
    mean_d = tl.sum(sums, axis=0) / S
    var = tl.maximum(tl.sum(squares, axis=0) / S - mean_d * mean_d, 0.0)
    mean = tl.load(x_ptr + base).to(tl.float32) + mean_d
    rstd = tl.math.rsqrt(var + eps)
    c0 = (r % G) * CG
    for off in tl.static_range(0, CHUNK, BLOCK):
        idx = j * CHUNK + off + tl.arange(0, BLOCK)
        mask = idx < S
        v = tl.load(x_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
        y = (v - mean) * rstd
        if AFFINE:
            c = c0 + idx // HW
            y = y * tl.load(w_ptr + c, mask=mask, other=0.0).to(tl.float32) \
                + tl.load(b_ptr + c, mask=mask, other=0.0).to(tl.float32)
        y = y.to(y_ptr.dtype.element_ty)
        if SILU:   # on the rounded GroupNorm output, as the host's separate SiLU reads it
            yf = y.to(tl.float32)
            y = (yf * tl.sigmoid(yf)).to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + base + idx, y, mask=mask)


# (BLOCK, CHUNK, num_warps): a chunk is CHUNK / BLOCK unrolled steps of one program. CHUNK 4096 gives SDXL's
# groups (40,960 to 163,840 elements at 1024²) 10 to 40 programs each: 320 to 1280 per pass at batch 1.
CONFIG = (1024, 4096, 4)
_MAX_SPLIT = 1024          # parts one apply program adds up (groups up to 4M elements)


def takes(x: torch.Tensor, groups: int, weight, bias) -> bool:
    """Whether the kernels can normalise ``x`` [N, C, *] (contiguous, a float dtype) in ``groups`` groups with
    ``weight`` / ``bias`` [C] (both or neither); else the caller runs the host's ops."""
    if x.dim() < 2 or not x.is_contiguous() or x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return False
    n, c = x.shape[:2]
    if groups <= 0 or c % groups or x.numel() == 0 or x.numel() >= 2**31:
        return False
    if triton_support.cdiv(x.numel() // (n * groups), CONFIG[1]) > _MAX_SPLIT:
        return False
    if (weight is None) != (bias is None):
        return False
    return weight is None or all(t.shape == (c,) and t.device == x.device and t.is_contiguous()
                                 for t in (weight, bias))


def group_norm(x: torch.Tensor, groups: int, weight, bias, eps: float, silu: bool = False,
               config: tuple | None = None) -> torch.Tensor:
    """``F.group_norm(x, groups, weight, bias, eps)``, followed by ``F.silu`` if ``silu``; ``x`` as ``takes``
    accepts it. The output has x's shape and dtype (contiguous). One-shot; call sites keep a ``GroupNorm``."""
    return GroupNorm(groups, eps, silu, config).run(x, weight, bias)


class GroupNorm:
    """One call site's GroupNorm (+ SiLU): its two launches, and from the second call at an input's (shape, dtype,
    alignment) and weights (addresses, dtype) a bound call: the learned C launchers (triton_launch) with the grid
    and every fixed argument worked out once, two allocations and two launches per call. Why: an eager SDXL step
    makes 46 of these calls and is host-bound; the general path's Python (checks, keys, specialization facts,
    launch lambdas) cost ~24 us per call on this machine's CPU against ~5 bound, launches not counted
    (bench/fused_ops_host.py)."""

    def __init__(self, groups: int, eps: float, silu: bool, config: tuple | None = None):
        self.groups, self.eps, self.silu = groups, float(eps), silu
        self.config = config or CONFIG
        self._calls = triton_launch.BoundCalls()   # key -> bound call, False (``run``), DECLINED (host ops)

    def __call__(self, x: torch.Tensor, weight, bias):
        """``run(x, weight, bias)``, or None where the kernels do not take ``x`` (the caller runs the host's ops)."""
        # The weights' addresses stand for their device, alignment and layout (a weight moved is a new key).
        key = (x.shape, x.dtype, x.is_contiguous(), x.data_ptr() % 16 == 0,
               None if weight is None else (weight.data_ptr(), weight.dtype, None if bias is None else bias.data_ptr()))
        return self._calls.call(key, self.run, self._bind, (x, weight, bias), self._takes)

    def _takes(self, x: torch.Tensor, weight, bias) -> bool:
        return takes(x, self.groups, weight, bias)

    def _geometry(self, x: torch.Tensor) -> tuple:
        n, c = x.shape[:2]
        rows = n * self.groups
        s = x.numel() // rows
        split = triton_support.cdiv(s, self.config[1])
        # The apply program adds up its group's SPLIT parts in one block of SPLIT_P lanes.
        return rows, s, s // (c // self.groups), c // self.groups, split, max(16, triton_support.next_power_of_2(split))

    def _keys(self, x, w, b, y_aligned: bool, geometry: tuple) -> tuple:
        """The two launches' keys (what Triton specializes on, triton_launch)."""
        block, chunk, warps = self.config
        rows, s, hw, cg, split, split_p = geometry
        facts = triton_launch.facts(x, s, split)
        return ((x.dtype, block, chunk, warps) + facts,
                (x.dtype, w.dtype, block, chunk, warps, split_p, w is not x, self.silu) + facts
                + (w.data_ptr() % 16 == 0, b.data_ptr() % 16 == 0, y_aligned)
                + triton_launch.facts(hw, cg, self.groups))

    def run(self, x: torch.Tensor, weight, bias) -> torch.Tensor:
        """The general path: both launches through triton_launch (Triton's dispatch at a key's first call)."""
        block, chunk, warps = self.config
        geometry = rows, s, hw, cg, split, split_p = self._geometry(x)
        parts = torch.empty((rows, split, 2), dtype=torch.float32, device=x.device)
        y = torch.empty_like(x)
        grid = (rows, split)
        affine = weight is not None
        w, b = (weight, bias) if affine else (x, x)
        stats_key, apply_key = self._keys(x, w, b, y.data_ptr() % 16 == 0, geometry)
        groups, eps = self.groups, self.eps
        triton_launch.shared(_gn_stats_kernel, "group_norm_stats")(
            stats_key, lambda meta: grid, lambda meta: (x, parts, s, split),
            dict(BLOCK=block, CHUNK=chunk, num_warps=warps))
        triton_launch.shared(_gn_apply_kernel, "group_norm_apply")(
            apply_key, lambda meta: grid, lambda meta: (x, w, b, y, parts, s, hw, cg, groups, split, eps),
            dict(BLOCK=block, CHUNK=chunk, SPLIT_P=split_p, AFFINE=affine, SILU=self.silu, num_warps=warps))
        return y

    def _bind(self, key, x, weight, bias) -> None:
        """After ``run`` at a new key: the bound call there, if both launches were learned with C launchers on the
        current device (else ``run`` stays: CPU, the interpreter, direct launches off)."""
        if not self._calls.open(key) or not x.is_contiguous():
            return
        stats = triton_launch.shared(_gn_stats_kernel, "group_norm_stats")
        apply = triton_launch.shared(_gn_apply_kernel, "group_norm_apply")
        geometry = rows, s, hw, cg, split, _ = self._geometry(x)
        affine = weight is not None
        # Fresh allocations (torch.empty) start 16-byte aligned: the key ``run`` saw for y.
        stats_key, apply_key = self._keys(x, weight if affine else x, bias if affine else x, True, geometry)
        records = stats.learned(stats_key), apply.learned(apply_key)
        if None in records:
            return
        device = stats.current_device()
        if device != x.get_device():
            return
        c_stats, c_apply = records[0].c_launch, records[1].c_launch
        current, stream_of = stats.current_device, stats.stream
        shape, dtype, where, groups, eps = x.shape, x.dtype, x.device, self.groups, self.eps

        def call(x, weight, bias):
            if current() != device:   # compiled kernels belong to the device they were made on
                return None
            stream = stream_of(device)
            parts = torch.empty((rows, split, 2), dtype=torch.float32, device=where)
            y = torch.empty(shape, dtype=dtype, device=where)
            w, b = (weight, bias) if affine else (x, x)
            c_stats(rows, split, 1, stream, (x, parts, s, split))
            c_apply(rows, split, 1, stream, (x, w, b, y, parts, s, hw, cg, groups, split, eps))
            return y
        self._calls[key] = call
