"""Query/key preparation of an attention in one pass: RMSNorm over each head (QK norm), then the rotary
embedding, read from the qkv projection's output in place and written in the layout attention reads.

Why: Flux's host code prepares q and k in ten to twelve launches per attention (two RMSNorms over strided
views, four dtype copies around the fp32 RoPE, its multiply and addcmul_, and in the double blocks a cat of
the text and image streams), each a full pass over 4608 x 3072 values, in fp32 for the RoPE: on an H200
~23 ms of a 129 ms INT8 Flux step (docs/BENCHMARKS.md, call 1's profile). One kernel reads q and k once
(bf16) and writes them once. Used by octet/deferred.py: ``PendingQK`` keeps Flux's norm outputs pending
until the host's ``apply_rope`` receives them; ``PendingRMS`` runs SD3's QK norms (no RoPE) the same way.

Numerics follow the host's ops (reference: ``torch_ref.qk_norm_rope``): the norm in fp32 with the weight
cast to the activation dtype first, its output rounded to the activation dtype (the host stores it), the
RoPE in fp32 on that, rounded once at the end.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_launch, triton_support


@triton.jit
def _norm_rope_head(x_ptr, sxb, sxh, sxl, w_ptr, eps, o_ptr, sob, soh, sol, b, h, rows, l_offset, mask,
                    f00, f01, f10, f11, D: tl.constexpr, BLOCK_L: tl.constexpr, ROPE: tl.constexpr):
    cols = tl.arange(0, D)
    x = tl.load(x_ptr + b * sxb + h * sxh + rows[:, None] * sxl + cols[None, :], mask=mask[:, None], other=0.0)
    xf = x.to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(xf * xf, axis=1) / D + eps)
    w = tl.load(w_ptr + cols).to(x.dtype).to(tl.float32)       # the host casts the weight to x's dtype
    y = (xf * rstd[:, None] * w[None, :]).to(o_ptr.dtype.element_ty)
    if ROPE:
        y0, y1 = tl.split(tl.reshape(y.to(tl.float32), (BLOCK_L, D // 2, 2)))
        out = tl.reshape(tl.join(f00 * y0 + f01 * y1, f10 * y0 + f11 * y1), (BLOCK_L, D))
    else:
        out = y
    tl.store(o_ptr + b * sob + h * soh + (rows + l_offset)[:, None] * sol + cols[None, :],
             out.to(o_ptr.dtype.element_ty), mask=mask[:, None])


@triton.jit
def _qk_norm_rope_kernel(q_ptr, k_ptr, wq_ptr, wk_ptr, f_ptr, oq_ptr, ok_ptr, L, H, l_offset,
                         sqb, sqh, sql, skb, skh, skl, sfb, sfl, sob, soh, sol, eps_q, eps_k,
                         D: tl.constexpr, BLOCK_L: tl.constexpr, HEADS: tl.constexpr, ROPE: tl.constexpr):
    # One program: BLOCK_L tokens of one batch entry, HEADS heads, q and k (the freqs tile read once for them).
    # Without ROPE (SD3's QK norm) only the RMSNorm, of one tensor (q_ptr's).
    pid_l = tl.program_id(0)
    h0 = tl.program_id(1) * HEADS
    b = tl.program_id(2)
    rows = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    mask = rows < L
    # freqs [B or 1, 1, L_total, D/2, 2, 2] fp32: a row's 2*D values [d, i, j] at d*4 + i*2 + j, read contiguously.
    if ROPE:
        f = tl.load(f_ptr + b * sfb + (rows + l_offset)[:, None] * sfl + tl.arange(0, 2 * D)[None, :],
                    mask=mask[:, None], other=0.0)
        f0, f1 = tl.split(tl.reshape(f, (BLOCK_L, D // 2, 2, 2)))     # [.., i, 0] and [.., i, 1]
        f00, f10 = tl.split(f0)
        f01, f11 = tl.split(f1)
    else:
        f00 = 0.0
        f01 = 0.0
        f10 = 0.0
        f11 = 0.0
    for i in tl.static_range(HEADS):
        h = h0 + i
        if h < H:
            _norm_rope_head(q_ptr, sqb, sqh, sql, wq_ptr, eps_q, oq_ptr, sob, soh, sol, b, h, rows, l_offset, mask,
                            f00, f01, f10, f11, D, BLOCK_L, ROPE)
            if ROPE:
                _norm_rope_head(k_ptr, skb, skh, skl, wk_ptr, eps_k, ok_ptr, sob, soh, sol, b, h, rows, l_offset,
                                mask, f00, f01, f10, f11, D, BLOCK_L, ROPE)


@triton.jit
def _row_norm_rope_kernel(x_ptr, w_ptr, f_ptr, o_ptr, L, H, sxb, sxl, sfb, sfl, sob, sol, eps,
                          D: tl.constexpr, BLOCK_L: tl.constexpr):
    # Wan's q (or k): one program is BLOCK_L tokens of one batch entry. RMSNorm over the whole row (H heads of D,
    # the projection's width), then the RoPE of each head with the token's freqs (the same for every head).
    pid_l = tl.program_id(0)
    b = tl.program_id(1)
    rows = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    mask = rows < L
    cols = tl.arange(0, D)
    x_rows = x_ptr + b * sxb + rows[:, None] * sxl + cols[None, :]
    acc = tl.zeros((BLOCK_L,), dtype=tl.float32)
    for h in range(H):
        xf = tl.load(x_rows + h * D, mask=mask[:, None], other=0.0).to(tl.float32)
        acc += tl.sum(xf * xf, axis=1)
    rstd = tl.math.rsqrt(acc / (H * D) + eps)
    f = tl.load(f_ptr + b * sfb + rows[:, None] * sfl + tl.arange(0, 2 * D)[None, :], mask=mask[:, None], other=0.0)
    f0, f1 = tl.split(tl.reshape(f, (BLOCK_L, D // 2, 2, 2)))
    f00, f10 = tl.split(f0)
    f01, f11 = tl.split(f1)
    for h in range(H):
        x = tl.load(x_rows + h * D, mask=mask[:, None], other=0.0)
        w = tl.load(w_ptr + h * D + cols).to(x.dtype).to(tl.float32)     # the host casts the weight to x's dtype
        y = (x.to(tl.float32) * rstd[:, None] * w[None, :]).to(o_ptr.dtype.element_ty)    # the norm's output
        y0, y1 = tl.split(tl.reshape(y.to(tl.float32), (BLOCK_L, D // 2, 2)))
        out = tl.reshape(tl.join(f00 * y0 + f01 * y1, f10 * y0 + f11 * y1), (BLOCK_L, D))
        tl.store(o_ptr + b * sob + rows[:, None] * sol + h * D + cols[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=mask[:, None])


@triton.jit
def _qkv_heads_kernel(x_ptr, wq_ptr, wk_ptr, o_ptr, L, H, l_offset, sxb, sxl, splane, sob, sol, eps_q, eps_k,
                      D: tl.constexpr, BLOCK_L: tl.constexpr, HEADS: tl.constexpr, V: tl.constexpr):
    # SD3's attention inputs from one stream's qkv projection [B, L, 3*H*D]: one program is BLOCK_L tokens of one
    # batch entry and HEADS heads; each head's q and k RMS-normalised (ln_q / ln_k), v copied (V), written at
    # tokens l_offset.. of the joint [B, L_total, H*D] outputs (MMDiT's cat of the context and image streams): the
    # planes of one [2 or 3, B, L_total, H*D] tensor, splane apart.
    pid_l = tl.program_id(0)
    h0 = tl.program_id(1) * HEADS
    b = tl.program_id(2)
    rows = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    mask = rows < L
    for i in tl.static_range(HEADS):
        h = h0 + i
        if h < H:
            _norm_rope_head(x_ptr, sxb, D, sxl, wq_ptr, eps_q, o_ptr, sob, D, sol, b, h, rows, l_offset, mask,
                            0.0, 0.0, 0.0, 0.0, D, BLOCK_L, False)
            _norm_rope_head(x_ptr + H * D, sxb, D, sxl, wk_ptr, eps_k, o_ptr + splane, sob, D, sol, b, h, rows,
                            l_offset, mask, 0.0, 0.0, 0.0, 0.0, D, BLOCK_L, False)
            if V:
                cols = tl.arange(0, D)
                v = tl.load(x_ptr + 2 * H * D + b * sxb + h * D + rows[:, None] * sxl + cols[None, :],
                            mask=mask[:, None], other=0.0)
                tl.store(o_ptr + 2 * splane + b * sob + h * D + (rows + l_offset)[:, None] * sol + cols[None, :], v,
                         mask=mask[:, None])


# (BLOCK_L, HEADS, num_warps). bench/deferred_kernels.py --sweep on an H200 (2026-12-02, Flux 24 x 128 heads):
# (16, 1, 4) 37.1 us single block / 40.2 us double block; (16, 8, 4) 35.4 / 50.4; (32, 8, 4) 41.0 / 63.9; the
# first version (32 tokens x 1 head, freqs read in four strided loads) 143 us. The contiguous freqs read is
# what mattered; sharing it across heads did not (fewer programs on the 512-token text stream cost more).
CONFIG = (16, 1, 4)
# Under the CPU interpreter (tests) a program costs milliseconds of numpy whatever its size, and this kernel's
# grid made every Flux-class sample in the suite spend most of its time here (a 4-step CPU sample of the
# reference DiT: 29 of 35 s in 1152 programs). 64 tokens per program: a quarter of the programs, the same
# numbers (each row is computed alone); the GPU's config is still run there by the kernel tests, explicitly.
INTERPRETER_CONFIG = (64, 1, 4)


def _config(config: tuple | None) -> tuple:
    return config or (INTERPRETER_CONFIG if triton_support.interpreting() else CONFIG)


def takes_rows(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the kernel can normalise the head rows of ``x`` (4-D, heads of D = a power of two, unit stride
    along D) with ``weight`` [D]."""
    if x.dim() != 4 or x.stride(-1) != 1 or x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return False
    d = x.shape[-1]
    return not (d < 4 or d & (d - 1) or weight.shape != (d,) or weight.device != x.device
                or not weight.is_contiguous())


def takes(x: torch.Tensor, weight: torch.Tensor, freqs: torch.Tensor) -> bool:
    """Whether the kernel can prepare head rows ``x`` [B, H, L, D] with ``weight`` [D] and Flux's ``freqs``
    [B or 1, 1, L_total, D/2, 2, 2] (fp32, last three dims contiguous); else the caller runs the host's ops."""
    if not takes_rows(x, weight):
        return False
    d = x.shape[-1]
    return (freqs.dim() == 6 and freqs.dtype == torch.float32 and freqs.device == x.device
            and freqs.shape[0] in (1, x.shape[0]) and freqs.shape[1] == 1 and tuple(freqs.shape[3:]) == (d // 2, 2, 2)
            and freqs.stride(5) == 1 and freqs.stride(4) == 2 and freqs.stride(3) == 4)


def _launch(tensors: tuple, ints: tuple, eps: tuple, grid: tuple, d: int, config: tuple, rope: bool) -> None:
    """One launch of the kernel over one segment: ``tensors`` (q, k, wq, wk, freqs, out_q, out_k) (the unused
    ones any tensor), ``ints`` its runtime integers in kernel order."""
    block_l, heads, warps = config
    key = (rope, tensors[0].dtype, tensors[5].dtype, d, *config) + triton_launch.facts(*tensors[:5], *ints)
    launcher = triton_launch.shared(_qk_norm_rope_kernel, "qk_norm_rope")
    launcher(key, lambda meta: grid, lambda meta: (*tensors, *ints, float(eps[0]), float(eps[1])),
             dict(D=d, BLOCK_L=block_l, HEADS=heads, ROPE=rope, num_warps=warps))


def qk_norm_rope(segments: list, freqs: torch.Tensor, dtype: torch.dtype,
                 config: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k [B, H, sum(L_i), D] (contiguous, ``dtype``) from ``segments``: (q_i, k_i, wq_i, wk_i, eps_q_i,
    eps_k_i) per stretch of tokens (Flux's double block: the text stream's, then the image stream's, each
    normalised with its own weights), concatenated along the tokens; row t uses freqs row t. Callers check
    ``takes`` for every tensor and that freqs has exactly sum(L_i) rows."""
    config = _config(config)
    q0 = segments[0][0]
    b, h, _, d = q0.shape
    total = sum(s[0].shape[2] for s in segments)
    out_q = torch.empty((b, h, total, d), dtype=dtype, device=q0.device)
    out_k = torch.empty_like(out_q)
    sfb = freqs.stride(0) if freqs.shape[0] > 1 else 0
    offset = 0
    for q, k, wq, wk, eps_q, eps_k in segments:
        length = q.shape[2]
        if length:
            ints = (length, h, offset, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                    sfb, freqs.stride(2), out_q.stride(0), out_q.stride(1), out_q.stride(2))
            _launch((q, k, wq, wk, freqs, out_q, out_k), ints, (eps_q, eps_k),
                    (triton_support.cdiv(length, config[0]), triton_support.cdiv(h, config[1]), b), d, config, True)
        offset += length
    return out_q, out_k


def rms_norm_heads(segments: list, dtype: torch.dtype, config: tuple | None = None) -> torch.Tensor:
    """[B, sum(L_i), H, D] (contiguous, ``dtype``): RMSNorm over D of each (x_i [B, L_i, H, D] (any strides
    with unit stride along D), weight_i, eps_i), concatenated along the tokens: SD3's ln_q / ln_k on the
    context and image streams' qkv views, then MMDiT's cat of the two streams."""
    config = _config(config)
    x0 = segments[0][0]
    b, _, h, d = x0.shape
    total = sum(s[0].shape[1] for s in segments)
    out = torch.empty((b, total, h, d), dtype=dtype, device=x0.device)
    offset = 0
    for x, w, eps in segments:
        length = x.shape[1]
        if length:
            # The kernel's (batch, head, token) strides of x and of the output; k, freqs and their strides unused.
            ints = (length, h, offset, x.stride(0), x.stride(2), x.stride(1), 0, 0, 0, 0, 0,
                    out.stride(0), out.stride(2), out.stride(1))
            _launch((x, x, w, w, x, out, out), ints, (eps, eps),
                    (triton_support.cdiv(length, config[0]), triton_support.cdiv(h, config[1]), b), d, config, False)
        offset += length
    return out


# (BLOCK_L, HEADS, num_warps) of the q/k/v kernel. bench/deferred_kernels.py --only sd3 --sweep on an H200
# (2026-12-05, SD3.5-medium's joint attention at batch 2, 333 + 4096 tokens, 24 heads of 64): (16, 1, 4) 47.3 us
# (3.45 TB/s), (16, 2, 4) 49.6, (32, 2, 4) 49.8, (64, 2, 8) 49.8, (16, 4, 4) 54.7, (8, 4, 2) 55.7; the host's
# split, QK norms and cats 447.8 us. Under the interpreter 64 tokens a program, as above.
QKV_CONFIG = (16, 1, 4)
QKV_INTERPRETER_CONFIG = (64, 4, 4)


def takes_qkv(x: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor, heads: int) -> bool:
    """Whether ``QKVHeads`` can read one stream's qkv projection output ``x`` [B, L, 3*H*D] (unit stride along the
    row, a float dtype, D a power of two) with ln_q / ln_k weights ``wq``, ``wk`` [D] (contiguous, on x's device)."""
    if x.dim() != 3 or x.stride(-1) != 1 or x.dtype not in (torch.bfloat16, torch.float16, torch.float32) \
            or heads <= 0 or x.shape[-1] % (3 * heads) or x.numel() >= 2**31:
        return False
    d = x.shape[-1] // (3 * heads)
    return not (d < 4 or d & (d - 1)) and all(
        isinstance(w, torch.Tensor) and w.shape == (d,) and w.device == x.device and w.is_contiguous()
        and w.dtype.is_floating_point for w in (wq, wk))


class QKVHeads:
    """One attention's q, k and v from its streams' qkv projections, where SD3's host code runs ``split_qkv``, the
    ln_q / ln_k RMSNorms over each head's 64-wide rows (after a copy of the strided view) and, in a joint block,
    three cats of the context and image streams: per stream one kernel reads the projection output once and writes
    normalised q, k and (``with_v``) v straight into the joint layout. An SD3.5-medium step at 1024² spent 4.9 ms of
    its 34 ms of GPU time in those norms and 1.7 ms in cats (H200, docs/BENCHMARKS.md), and ~0.2 ms of host time per
    joint block issuing them. Numerics as ``rms_norm_heads`` (the host's: fp32, the weight cast to x's dtype first,
    one rounding); v is copied. From the second call at a key (the streams' shapes, strides, dtype, alignments) a
    bound call (triton_launch.BoundCalls: the learned C launchers, grids and fixed arguments worked out once)."""

    def __init__(self, heads: int, with_v: bool = True, config: tuple | None = None):
        self.heads, self.with_v = heads, with_v
        self.config = config or (QKV_INTERPRETER_CONFIG if triton_support.interpreting() else QKV_CONFIG)
        self._calls = triton_launch.BoundCalls()

    def __call__(self, segments: tuple):
        """(q [B, L, H*D], k [B, L, H*D], v [B, L, H, D] or None) for ``segments`` ((x, wq, wk, eps_q, eps_k), ...) in
        token order; None where the kernel does not take them (the caller runs the host's ops)."""
        key = tuple((x.shape, x.stride(0), x.stride(1), x.dtype, x.data_ptr() % 16 == 0, wq.data_ptr() % 16 == 0,
                     wk.data_ptr() % 16 == 0, eq, ek) for x, wq, wk, eq, ek in segments)
        return self._calls.call(key, self.run, self._bind, (segments,), self.takes)

    def takes(self, segments: tuple) -> bool:
        x0 = segments[0][0]
        return all(takes_qkv(x, wq, wk, self.heads) and x.dtype == x0.dtype and x.shape[0] == x0.shape[0]
                   and x.shape[2] == x0.shape[2] and x.device == x0.device for x, wq, wk, _, _ in segments) \
            and (3 if self.with_v else 2) * x0.shape[0] * sum(s[0].shape[1] for s in segments) * x0.shape[2] // 3 < 2**31

    def _plan(self, segments: tuple):
        """The output's shape and, per stream, its launch key, grid and runtime integers."""
        block_l, heads_per, warps = self.config
        x0 = segments[0][0]
        b, width, h = x0.shape[0], x0.shape[2] // 3, self.heads
        total = sum(x.shape[1] for x, *_ in segments)
        shape = (3 if self.with_v else 2, b, total, width)
        splane, sob, sol = b * total * width, total * width, width
        launches, offset = [], 0
        for x, wq, wk, eq, ek in segments:
            length = x.shape[1]
            if length:
                ints = (length, h, offset, x.stride(0), x.stride(1), splane, sob, sol)
                grid = (triton_support.cdiv(length, block_l), triton_support.cdiv(h, heads_per), b)
                launches.append((ints, grid, (float(eq), float(ek))))
            offset += length
        return shape, launches

    def _flags(self, d: int) -> dict:
        block_l, heads_per, warps = self.config
        return dict(D=d, BLOCK_L=block_l, HEADS=heads_per, V=self.with_v, num_warps=warps)

    def _key(self, x, wq, wk, out_aligned: bool, ints: tuple) -> tuple:
        return (x.dtype, self.with_v, *self.config) + triton_launch.facts(x, wq, wk, *ints) + (out_aligned,)

    def _outputs(self, out: torch.Tensor):
        q, k, *v = out.unbind(0)
        return q, k, (v[0].view(*v[0].shape[:2], self.heads, -1) if v else None)

    def run(self, segments: tuple):
        """The general path: a launch per stream through triton_launch (Triton's dispatch at a key's first call)."""
        x0 = segments[0][0]
        shape, launches = self._plan(segments)
        out = torch.empty(shape, dtype=x0.dtype, device=x0.device)
        aligned = out.data_ptr() % 16 == 0
        launcher = triton_launch.shared(_qkv_heads_kernel, "qkv_heads")
        flags = self._flags(shape[3] // self.heads)
        for (x, wq, wk, _, _), (ints, grid, eps) in zip((s for s in segments if s[0].shape[1]), launches):
            launcher(self._key(x, wq, wk, aligned, ints), lambda meta, g=grid: g,
                     lambda meta, a=(x, wq, wk, out, *ints, *eps): a, flags)
        return self._outputs(out)

    def _bind(self, key, segments: tuple) -> None:
        """After ``run`` at a new key: the bound call there, if every launch was learned with a C launcher on the
        current device (else ``run`` stays)."""
        if not self._calls.open(key):
            return
        launcher = triton_launch.shared(_qkv_heads_kernel, "qkv_heads")
        shape, launches = self._plan(segments)
        present = [s for s in segments if s[0].shape[1]]
        records = [launcher.learned(self._key(x, wq, wk, True, ints))     # fresh allocations start 16-byte aligned
                   for (x, wq, wk, _, _), (ints, _, _) in zip(present, launches)]
        if any(r is None for r in records):
            return
        device = launcher.current_device()
        if device != segments[0][0].get_device():
            return
        steps = tuple((r.c_launch, grid, ints, eps) for r, (ints, grid, eps) in zip(records, launches))
        current, stream_of, dtype, where = launcher.current_device, launcher.stream, segments[0][0].dtype, \
            segments[0][0].device
        skip = tuple(i for i, s in enumerate(segments) if s[0].shape[1])
        outputs = self._outputs

        def call(segments):
            if current() != device:   # the compiled kernels belong to the device they were made on
                return None
            out = torch.empty(shape, dtype=dtype, device=where)
            stream = stream_of(device)
            for i, (c_launch, (gx, gy, gz), ints, eps) in zip(skip, steps):
                x, wq, wk, _, _ = segments[i]
                c_launch(gx, gy, gz, stream, (x, wq, wk, out, *ints, *eps))
            return outputs(out)
        self._calls[key] = call


# (BLOCK_L, num_warps) of the row kernel: on the GPU not tuned yet (written without a device; a program reads a
# token's row twice, the second time from cache); under the interpreter 64 tokens per program, as above.
ROW_CONFIG = (16, 4)
ROW_INTERPRETER_CONFIG = (64, 4)


def takes_row_rope(x: torch.Tensor, weight: torch.Tensor, freqs: torch.Tensor, heads: int) -> bool:
    """Whether ``row_norm_rope`` can prepare ``x`` [B, L, H*D] (unit stride along the row) with ``weight`` [H*D]
    and Wan's ``freqs`` [B or 1, L, 1, D/2, 2, 2] (fp32, last three dims contiguous)."""
    if x.dim() != 3 or x.stride(-1) != 1 or x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return False
    width = x.shape[-1]
    if heads <= 0 or width % heads:
        return False
    d = width // heads
    return (not (d < 4 or d & (d - 1)) and weight.shape == (width,) and weight.device == x.device
            and weight.is_contiguous() and freqs.dim() == 6 and freqs.dtype == torch.float32
            and freqs.device == x.device and freqs.shape[0] in (1, x.shape[0]) and freqs.shape[1] == x.shape[1]
            and freqs.shape[2] == 1 and tuple(freqs.shape[3:]) == (d // 2, 2, 2) and freqs.stride(5) == 1
            and freqs.stride(4) == 2 and freqs.stride(3) == 4)


def row_norm_rope(x: torch.Tensor, weight: torch.Tensor, eps: float, freqs: torch.Tensor, heads: int,
                  config: tuple | None = None) -> torch.Tensor:
    """Wan's q or k as its host code prepares them (``norm_q(q(x)).view(b, s, n, d)`` then ``apply_rope1``;
    reference ``torch_ref.row_norm_rope``): [B, L, H, D] contiguous in x's dtype. Callers check
    ``takes_row_rope``."""
    block_l, warps = config or (ROW_INTERPRETER_CONFIG if triton_support.interpreting() else ROW_CONFIG)
    b, length, width = x.shape
    d = width // heads
    out = torch.empty((b, length, heads, d), dtype=x.dtype, device=x.device)
    sfb = freqs.stride(0) if freqs.shape[0] > 1 else 0
    ints = (length, heads, x.stride(0), x.stride(1), sfb, freqs.stride(1), out.stride(0), out.stride(1))
    key = (x.dtype, d, block_l, warps) + triton_launch.facts(x, weight, freqs, out, *ints)
    triton_launch.shared(_row_norm_rope_kernel, "row_norm_rope")(
        key, lambda meta: (triton_support.cdiv(length, block_l), b),
        lambda meta: (x, weight, freqs, out, *ints, float(eps)), dict(D=d, BLOCK_L=block_l, num_warps=warps))
    return out
