"""The INT8 GEMM in Triton, with the dequantization fused into the epilogue.

``w8a8_gemm``:  int8 activations [M, K] x int8 weight [N, K] -> int32 accumulators ->
                y = acc * a_scale[m] * w_scale[n] (+ bias[n]) in fp32, stored in the output dtype.
(Weight-only INT8, float activations x int8 weight, is triton_w8a16; the float-activation wrappers
share ``check_float_gemm`` from here.)

It reads the weight as stored, [N, K] with K contiguous: that is the K-major B operand that
Hopper's int8 wgmma needs anyway, so no transpose is ever materialised.

Tiles are visited in grouped order (GROUP_M row-tiles share each column sweep) so that the
weight tiles a group needs stay in L2. Autotune keys on (M bucket, N, K): M varies with batch and
resolution, and rounding it to a power of two keeps the number of tuning runs small. On Hopper
the operands come through TMA descriptors (bulk copies into shared memory, out-of-range parts
zero-filled by the hardware) whenever K's row pitch is 16-byte aligned; otherwise, and on
Ampere/Ada, through masked pointer loads.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .. import registry
from ..torch_ref import gelu_tanh_quantize
from ..registry import m_bucket  # noqa: F401  (the one signature bucket; conv imports it from here)
from . import triton_launch, triton_support
from .triton_math import gelu_tanh, round_to_grid

_MAX_INT32 = 2**31 - 1


# ---- configurations ----------------------------------------------------------------------------

def _cfg(bm, bn, bk, stages, warps, group_m=8, persistent=False, pre_hook=None):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m,
                          "PERSISTENT": persistent},
                         num_stages=stages, num_warps=warps, pre_hook=pre_hook)


_set_descriptor_blocks = triton_support.tma_box_hook("a", "b")


def w8a8_configs() -> list:
    """Candidate tiles for the int8 GEMM, chosen per GPU generation.

    Hopper (sm90): wgmma wants 64-row warpgroup tiles and K=128 int8 steps (128 bytes = one
    128B-swizzled smem row); 228 KB of shared memory allows 3-4 stages of 128x256x128.
    Ampere/Ada (sm80/86/89): mma.sync with ~100-164 KB of shared memory: K=64 steps, more stages.
    Under the CPU interpreter every config costs seconds of numpy, so there is exactly one.
    """
    hook = _set_descriptor_blocks
    if triton_support.interpreting():
        return [_cfg(32, 32, 64, 1, 4, group_m=2, pre_hook=hook)]
    if triton_support.capability()[0] >= 9:
        return [
            _cfg(128, 256, 128, 3, 8, pre_hook=hook),
            _cfg(256, 128, 128, 3, 8, pre_hook=hook),
            _cfg(128, 256, 128, 4, 8, pre_hook=hook),
            _cfg(128, 128, 128, 4, 8, pre_hook=hook),
            _cfg(128, 128, 128, 4, 4, pre_hook=hook),
            _cfg(128, 256, 64, 4, 8, pre_hook=hook),
            _cfg(128, 256, 128, 3, 8, persistent=True, pre_hook=hook),
            _cfg(128, 128, 128, 4, 8, persistent=True, pre_hook=hook),
            _cfg(128, 256, 128, 4, 8, persistent=True, pre_hook=hook),
            _cfg(256, 128, 128, 3, 8, persistent=True, pre_hook=hook),
            _cfg(128, 256, 64, 4, 8, persistent=True, pre_hook=hook),
            _cfg(64, 128, 128, 4, 4, pre_hook=hook),
            _cfg(128, 64, 128, 4, 4, pre_hook=hook),
            _cfg(64, 64, 128, 4, 4, pre_hook=hook),
            _cfg(64, 256, 128, 3, 4, pre_hook=hook),
        ]
    return [
        _cfg(128, 256, 64, 3, 8),
        _cfg(256, 128, 64, 3, 8),
        _cfg(128, 128, 64, 4, 4),
        _cfg(128, 128, 128, 3, 8),
        _cfg(64, 128, 64, 4, 4),
        _cfg(128, 64, 64, 4, 4),
        _cfg(64, 64, 64, 5, 2),
        _cfg(64, 64, 128, 4, 4),
    ]


def _prune(configs, named_args, **kwargs):
    """Drop tiles far taller than M (wasted MMA rows), and persistent tiles without TMA operands;
    keep at least the smallest."""
    m = named_args["M"]
    tma = kwargs.get("USE_TMA", named_args.get("USE_TMA", False))
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= max(16, triton_support.next_power_of_2(m))
            and (tma or not c.kwargs["PERSISTENT"])]
    return triton_support.survivors(configs, kept)




# ---- kernels -----------------------------------------------------------------------------------

@triton.jit
def _grouped_tile(tile_id, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    # L2 swizzle: consecutive programs walk down GROUP_M row-tiles before moving to the next
    # column-tile, so a group reuses the same weight tiles while they are still cached.
    group_size = GROUP_M * num_pid_n
    first_m = (tile_id // group_size) * GROUP_M
    rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (tile_id % group_size) % rows
    pid_n = (tile_id % group_size) // rows
    return pid_m, pid_n


@triton.jit
def _dequantized(acc, a_scale_ptr, w_scale_ptr, bias_ptr, M, N, stride_as, pid_m, pid_n, HAS_BIAS: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # A tile's fp32 output in torch_ref.gemm_epilogue's order, ((acc * sa) * sw) + bias, with its rows, columns and
    # their masks: what every epilogue starts from.
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    a_scale = tl.load(a_scale_ptr + offs_m * stride_as, mask=mask_m, other=0.0)
    w_scale = tl.load(w_scale_ptr + offs_n, mask=mask_n, other=0.0)
    y = acc.to(tl.float32) * a_scale[:, None] * w_scale[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    return y, offs_m, offs_n, mask_m, mask_n


@triton.jit
def _w8a8_epilogue(acc, c_ptr, a_scale_ptr, w_scale_ptr, bias_ptr, q_smooth_ptr, q_scale_ptr, M, N, stride_cm,
                   stride_as, pid_m, pid_n, HAS_BIAS: tl.constexpr, GELU_QUANT: tl.constexpr,
                   HAS_Q_SMOOTH: tl.constexpr, GELU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # The dequantized tile (GELU,) then one rounding.
    y, offs_m, offs_n, mask_m, mask_n = _dequantized(acc, a_scale_ptr, w_scale_ptr, bias_ptr, M, N, stride_as, pid_m,
                                                     pid_n, HAS_BIAS, BLOCK_M, BLOCK_N)
    if GELU_QUANT:
        # The next layer's static INT8 input, as torch_ref.gelu_tanh_quantize computes it: its
        # scale is known before the call, so no reduction over the row (other programs' columns)
        # is needed, and the hidden activation never goes to memory in float.
        y = gelu_tanh(y)
        if HAS_Q_SMOOTH:
            y = tl.div_rn(y, tl.load(q_smooth_ptr + offs_n, mask=mask_n, other=1.0)[None, :])
        y = tl.div_rn(y, tl.load(q_scale_ptr))
        y = round_to_grid(y)
    elif GELU:
        # An MLP's fc1 with dynamic scales for fc2 (octet/fusion.py): the GELU on the fp32 value, so the hidden
        # activation is written once, already activated, and no GELU pass reads and writes it again.
        y = gelu_tanh(y)
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, y.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _w8a8_mainloop(a, b, M, N, K, stride_am, stride_bn, pid_m, pid_n, USE_TMA: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    if USE_TMA:
        for k0 in range(0, K, BLOCK_K):
            a_tile = a.load([pid_m * BLOCK_M, k0])
            b_tile = b.load([pid_n * BLOCK_N, k0])
            acc = tl.dot(a_tile, b_tile.T, acc, out_dtype=tl.int32)
    else:
        # Rows/cols past M/N wrap around (modulo) instead of being masked: they compute garbage
        # that the masked store drops, and the loads stay unmasked on those axes.
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = a + (offs_m % M)[:, None] * stride_am + offs_k[None, :]
        b_ptrs = b + (offs_n % N)[None, :] * stride_bn + offs_k[:, None]
        for k0 in range(0, K, BLOCK_K):
            a_tile = tl.load(a_ptrs, mask=offs_k[None, :] < K - k0, other=0)
            b_tile = tl.load(b_ptrs, mask=offs_k[:, None] < K - k0, other=0)
            acc = tl.dot(a_tile, b_tile, acc, out_dtype=tl.int32)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
    return acc


@triton.autotune(configs=w8a8_configs(),
                 do_bench=triton_support.tuning_bench, key=["M_BUCKET", "N", "K", "USE_TMA", "GELU_QUANT", "GELU"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _w8a8_kernel(a, b, c_ptr, a_scale_ptr, w_scale_ptr, bias_ptr, q_smooth_ptr, q_scale_ptr,
                 M, N, K, M_BUCKET, NUM_SMS, stride_am, stride_bn, stride_cm, stride_as,
                 HAS_BIAS: tl.constexpr, USE_TMA: tl.constexpr, GELU_QUANT: tl.constexpr,
                 HAS_Q_SMOOTH: tl.constexpr, GELU: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 GROUP_M: tl.constexpr, PERSISTENT: tl.constexpr):
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    if PERSISTENT:
        # One program per SM walks the tiles (TMA operands only, see _prune). flatten=True lets
        # Triton software-pipeline across tile boundaries, so the next tile's loads are in flight
        # while this tile's epilogue runs. The epilogue recomputes its tile from a second counter,
        # as Triton's persistent-matmul tutorial does, to keep the flattened loop simple.
        tile_c = tl.program_id(0) - NUM_SMS
        for tile_id in tl.range(tl.program_id(0), num_pid_m * num_pid_n, NUM_SMS, flatten=True):
            pid_m, pid_n = _grouped_tile(tile_id, num_pid_m, num_pid_n, GROUP_M)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
            for k0 in range(0, K, BLOCK_K):
                a_tile = a.load([pid_m * BLOCK_M, k0])
                b_tile = b.load([pid_n * BLOCK_N, k0])
                acc = tl.dot(a_tile, b_tile.T, acc, out_dtype=tl.int32)
            tile_c += NUM_SMS
            pid_m_c, pid_n_c = _grouped_tile(tile_c, num_pid_m, num_pid_n, GROUP_M)
            _w8a8_epilogue(acc, c_ptr, a_scale_ptr, w_scale_ptr, bias_ptr, q_smooth_ptr, q_scale_ptr, M, N,
                           stride_cm, stride_as, pid_m_c, pid_n_c, HAS_BIAS, GELU_QUANT, HAS_Q_SMOOTH, GELU,
                           BLOCK_M, BLOCK_N)
    else:
        pid_m, pid_n = _grouped_tile(tl.program_id(0), num_pid_m, num_pid_n, GROUP_M)
        acc = _w8a8_mainloop(a, b, M, N, K, stride_am, stride_bn, pid_m, pid_n, USE_TMA,
                             BLOCK_M, BLOCK_N, BLOCK_K)
        _w8a8_epilogue(acc, c_ptr, a_scale_ptr, w_scale_ptr, bias_ptr, q_smooth_ptr, q_scale_ptr, M, N,
                       stride_cm, stride_as, pid_m, pid_n, HAS_BIAS, GELU_QUANT, HAS_Q_SMOOTH, GELU, BLOCK_M,
                       BLOCK_N)


def _prune_residual(configs, named_args, **kwargs):
    """The residual kernel has one program per tile (no persistent loop): _prune's tiles, persistent ones dropped."""
    return _prune([c for c in configs if not c.kwargs["PERSISTENT"]] or configs[:1], named_args, **kwargs)


@triton.autotune(configs=w8a8_configs(),
                 do_bench=triton_support.tuning_bench, key=["M_BUCKET", "N", "K", "USE_TMA"],
                 prune_configs_by={"early_config_prune": _prune_residual})
@triton.jit
def _w8a8_residual_kernel(a, b, c_ptr, a_scale_ptr, w_scale_ptr, bias_ptr, res_ptr, gate_ptr,
                          M, N, K, M_BUCKET, L, stride_am, stride_bn, stride_cm, stride_as, stride_rm, stride_gb,
                          HAS_BIAS: tl.constexpr, USE_TMA: tl.constexpr, HOST_ROUNDING: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          GROUP_M: tl.constexpr, PERSISTENT: tl.constexpr):
    # A block's gated residual after its layer, out = res + layer(x) * gate[row // L] (Wan's
    # ``addcmul(x, ffn(...), e5)``): the layer's output stays in fp32 registers and is never written on its own,
    # and the residual pass that would read it back is gone. Same GEMM and dequantization as _w8a8_kernel
    # (torch_ref.gemm_epilogue); the residual, the gate and the sum in fp32, one rounding. HOST_ROUNDING rounds as
    # the host's two ops do (Flux's ``x += out * gate`` in a compiled graph, octet/compile_pass.py): the layer's
    # output and the product each to the output dtype first, so the result is the host's to the bit.
    pid_m, pid_n = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    acc = _w8a8_mainloop(a, b, M, N, K, stride_am, stride_bn, pid_m, pid_n, USE_TMA, BLOCK_M, BLOCK_N, BLOCK_K)
    y, offs_m, offs_n, mask_m, mask_n = _dequantized(acc, a_scale_ptr, w_scale_ptr, bias_ptr, M, N, stride_as, pid_m,
                                                     pid_n, HAS_BIAS, BLOCK_M, BLOCK_N)
    mask = mask_m[:, None] & mask_n[None, :]
    rows = offs_m.to(tl.int64)
    res = tl.load(res_ptr + rows[:, None] * stride_rm + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(gate_ptr + (rows // L)[:, None] * stride_gb + offs_n[None, :], mask=mask, other=0.0)
    if HOST_ROUNDING:
        dtype = c_ptr.dtype.element_ty
        out = res + (y.to(dtype).to(tl.float32) * gate.to(tl.float32)).to(dtype).to(tl.float32)
    else:
        out = res + y * gate.to(tl.float32)
    tl.store(c_ptr + rows[:, None] * stride_cm + offs_n[None, :], out.to(c_ptr.dtype.element_ty), mask=mask)


# ---- wrappers ----------------------------------------------------------------------------------

def _check_weight(qweight: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None, k: int):
    if qweight.dtype != torch.int8 or qweight.dim() != 2 or qweight.shape[1] != k:
        raise ValueError(f"qweight must be int8 [N, K={k}], got {qweight.dtype} {tuple(qweight.shape)}")
    n = qweight.shape[0]
    if w_scale.numel() != n:
        raise ValueError(f"w_scale must have N={n} entries, got shape {tuple(w_scale.shape)}")
    if bias is not None and bias.numel() != n:
        raise ValueError(f"bias must have N={n} entries, got shape {tuple(bias.shape)}")


def check_float_gemm(x2d: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor,
                     bias: torch.Tensor | None) -> tuple[int, int, int]:
    """(M, N, K) of float [M, K] x int8 [N, K]^T, after the checks every such wrapper needs (shapes,
    dtypes, 32-bit indexing): one copy for the W8A16 and static-prologue kernels."""
    if x2d.dim() != 2 or not x2d.is_floating_point():
        raise ValueError(f"x must be float [M, K], got {x2d.dtype} {tuple(x2d.shape)}")
    m, k = x2d.shape
    _check_weight(qweight, w_scale, bias, k)
    n = qweight.shape[0]
    if max(m * k, n * k, m * n) > _MAX_INT32:
        raise ValueError(f"GEMM {m}x{n}x{k} exceeds 32-bit indexing; split the batch")
    return m, n, k


def _vector(t: torch.Tensor, device) -> torch.Tensor:
    return t.reshape(-1).to(device=device, dtype=torch.float32).contiguous()


def _use_tma(k: int) -> bool:
    # TMA needs 16-byte aligned row pitches (int8: K % 16 == 0). The interpreter emulates
    # descriptors, so CI covers this path too.
    return k % 16 == 0 and (triton_support.is_hopper() or triton_support.interpreting())


class W8A8Gemm:
    """The weight side of one INT8 GEMM, checked and converted once; called per activation.

    A plan keeps one per layer and signature, so the per-call work is three allocations' worth of
    Python and one launch through ``triton_launch`` (the compiled launcher once Triton has chosen
    the config for this M bucket). ``gelu_quant=True`` is the static MLP's fc1: the epilogue applies
    GELU (tanh) and quantizes for the next layer (its smoothing ``q_smooth`` fixed here, its static
    scale passed per call), returning int8 codes; torch_ref.gelu_tanh_quantize is the reference.
    ``gelu=True`` applies GELU (tanh) to the fp32 output before its one rounding (torch_ref.gemm_epilogue's
    ``gelu``): an MLP's fc1 whose fc2 quantizes per token.
    """

    def __init__(self, qweight: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                 gelu_quant: bool = False, q_smooth: torch.Tensor | None = None, gelu: bool = False):
        if qweight.dtype != torch.int8 or qweight.dim() != 2:
            raise ValueError(f"qweight must be int8 [N, K], got {qweight.dtype} {tuple(qweight.shape)}")
        self.n, self.k = qweight.shape
        _check_weight(qweight, w_scale, bias, self.k)
        if q_smooth is not None and q_smooth.numel() != self.n:
            raise ValueError(f"gelu_quant smoothing has {q_smooth.numel()} entries for N={self.n} channels")
        device = qweight.device
        self.qweight = qweight.contiguous()
        self.bias = bias
        self.w_scale = _vector(w_scale, device)
        if gelu and gelu_quant:
            raise ValueError("gelu and gelu_quant are two epilogues; pick one")
        self.gelu_quant, self.gelu = gelu_quant, gelu
        self.q_smooth = _vector(q_smooth, device) if q_smooth is not None else None
        self.use_tma = _use_tma(self.k)
        self.sms = triton_support.num_sms(device.index or 0) if qweight.is_cuda else 4
        self.flags = dict(HAS_BIAS=bias is not None, USE_TMA=self.use_tma, GELU_QUANT=gelu_quant,
                          HAS_Q_SMOOTH=self.q_smooth is not None, GELU=gelu)
        self.launcher = triton_launch.Launcher(_w8a8_kernel, "w8a8_gemm")
        self._residual_launcher = None        # the residual epilogue's, made at its first call (run_residual)
        self.weight_descs = triton_launch.WeightDescriptors(self.qweight) if self.use_tma else None

    def __call__(self, a_q: torch.Tensor, a_scale: torch.Tensor, out_dtype: torch.dtype,
                 q_scale: torch.Tensor | None = None) -> torch.Tensor:
        """int8 [M, K] codes with a_scale [M] (per token) or [1] (static) -> [M, N] in out_dtype
        (int8 codes at q_scale with gelu_quant)."""
        if a_q.dtype != torch.int8 or a_q.dim() != 2 or a_q.shape[1] != self.k:
            raise ValueError(f"a_q must be int8 [M, K={self.k}], got {a_q.dtype} {tuple(a_q.shape)}")
        if a_scale.numel() not in (1, a_q.shape[0]):
            raise ValueError(f"a_scale must have 1 or M={a_q.shape[0]} entries, got {a_scale.numel()}")
        if self.gelu_quant and (q_scale is None or q_scale.numel() != 1):
            raise ValueError("gelu_quant needs the next layer's one static scale")
        device = a_q.device
        if a_scale.dtype != torch.float32 or a_scale.dim() != 1 or a_scale.device != device:
            a_scale = _vector(a_scale, device)
        if self.gelu_quant and (q_scale.dtype != torch.float32 or q_scale.device != device):
            q_scale = _vector(q_scale, device)
        return self.run(a_q if a_q.is_contiguous() else a_q.contiguous(), a_scale, out_dtype, q_scale)

    def run(self, a_q: torch.Tensor, a_scale: torch.Tensor, out_dtype: torch.dtype,
            q_scale: torch.Tensor | None = None) -> torch.Tensor:
        """``__call__`` without its checks and conversions, for a plan whose operands are right by
        construction (a quantizer's contiguous codes, fp32 scales on the device): host time per layer."""
        m, k, n = a_q.shape[0], self.k, self.n
        if max(m * k, n * k, m * n) > _MAX_INT32:
            raise ValueError(f"GEMM {m}x{n}x{k} exceeds 32-bit indexing; split the batch")
        if self.gelu_quant:
            out_dtype = torch.int8
        device = a_q.device
        out = torch.empty((m, n), dtype=out_dtype, device=device)
        if m == 0 or n == 0:
            return out
        bias = self.bias
        if k == 0:
            zeros = torch.zeros((m, n), dtype=torch.float32, device=device)
            h = zeros + bias.float() if bias is not None else zeros
            if self.gelu_quant:
                return gelu_tanh_quantize(h, self.q_smooth, q_scale)
            return out.copy_(F.gelu(h, approximate="tanh") if self.gelu else h)
        w_scale = self.w_scale
        sms, per_token = self.sms, 0 if a_scale.numel() == 1 else 1
        bias_arg = bias if bias is not None else w_scale
        smooth_arg = self.q_smooth if self.q_smooth is not None else w_scale
        scale_arg = q_scale if q_scale is not None else w_scale
        bucket = m_bucket(m)

        def build(meta):
            return (*self._operands(a_q, meta), out, a_scale, w_scale, bias_arg, smooth_arg, scale_arg,
                    m, n, k, bucket, sms, k, k, n, per_token)

        def grid(meta):
            return (self._programs(m, meta),)

        key = self._key(out_dtype, m, a_q.data_ptr() % 16 == 0, per_token, per_token or a_scale.data_ptr() % 16 == 0,
                        scale_arg.data_ptr() % 16 == 0)
        self.launcher(key, grid, build, self.flags)
        return out

    def run_residual(self, a_q: torch.Tensor, a_scale: torch.Tensor, res: torch.Tensor, gate: torch.Tensor,
                     tokens: int, gate_stride: int, host_rounding: bool = False) -> torch.Tensor:
        """res + (this GEMM's output) * gate, in res's dtype: res [M, N] with unit column stride, gate rows of N
        (unit column stride) for batch entry row // tokens, ``gate_stride`` apart (0: one row for all). Codes and
        scales as ``run`` takes them (a plain plan's: no GELU epilogue). Reference: torch_ref.gemm_epilogue, then
        ``res.float() + y * gate.float()`` rounded once, or with ``host_rounding`` ``res + y.to(dtype) * gate`` as
        torch computes it (tests/kernels/test_triton_gemm.py)."""
        m, k, n = a_q.shape[0], self.k, self.n
        if self.gelu or self.gelu_quant:
            raise ValueError("the residual epilogue is a plain GEMM's")
        if max(m * k, n * k, m * n) > _MAX_INT32:
            raise ValueError(f"GEMM {m}x{n}x{k} exceeds 32-bit indexing; split the batch")
        out = torch.empty((m, n), dtype=res.dtype, device=a_q.device)
        if m == 0 or n == 0:
            return out
        if k == 0:      # the layer's output is its bias (or zeros)
            y = torch.zeros((m, n), dtype=torch.float32, device=a_q.device)
            if self.bias is not None:
                y = y + self.bias.float()
            batches = torch.as_strided(gate, (triton_support.cdiv(m, tokens), n), (gate_stride, 1))
            rows = torch.arange(m, device=a_q.device) // tokens
            if host_rounding:
                return out.copy_(res + y.to(res.dtype) * batches[rows])
            return out.copy_(res.float() + y * batches[rows].float())
        launcher = self._residual_launcher
        if launcher is None:
            launcher = self._residual_launcher = triton_launch.Launcher(_w8a8_residual_kernel, "w8a8_residual")
        w_scale, bias = self.w_scale, self.bias
        bias_arg = bias if bias is not None else w_scale
        per_token, bucket, rm = 0 if a_scale.numel() == 1 else 1, m_bucket(m), res.stride(0)

        def build(meta):
            return (*self._operands(a_q, meta), out, a_scale, w_scale, bias_arg, res, gate, m, n, k, bucket, tokens,
                    k, k, n, per_token, rm, gate_stride)

        def grid(meta):
            return (triton_support.cdiv(m, meta["BLOCK_M"]) * triton_support.cdiv(n, meta["BLOCK_N"]),)

        key = (res.dtype, gate.dtype, m_bucket(m), a_q.data_ptr() % 16 == 0, per_token,
               per_token or a_scale.data_ptr() % 16 == 0) + triton_launch.facts(m, tokens, rm, gate_stride, res, gate)
        launcher(key + (host_rounding,), grid, build, dict(HAS_BIAS=bias is not None, USE_TMA=self.use_tma,
                                                          HOST_ROUNDING=host_rounding))
        return out

    def _operands(self, a_q: torch.Tensor, meta: dict | None) -> tuple:
        """(a, b) as a launch of either kernel takes them: TMA descriptors where the weight's K allows (on Triton's
        path, meta None, a descriptor its autotuner re-boxes; on a direct launch, triton_launch.Tma at the config's
        box), else the codes and the weight themselves."""
        if not self.use_tma:
            return a_q, self.qweight
        m, k = a_q.shape
        a_arg = TensorDescriptor(a_q, [m, k], [k, 1], [16, 16]) if meta is None \
            else triton_launch.Tma(a_q, (m, k), (k, 1), (meta["BLOCK_M"], meta["BLOCK_K"]))
        return a_arg, self.weight_descs.get(meta)

    def _programs(self, m: int, meta: dict) -> int:
        """The launch grid's size for M rows at a config: one program per output tile, at most one per SM
        where the config is persistent."""
        tiles = triton_support.cdiv(m, meta["BLOCK_M"]) * triton_support.cdiv(self.n, meta["BLOCK_N"])
        return min(tiles, self.sms) if meta["PERSISTENT"] else tiles

    @staticmethod
    def _key(out_dtype, m: int, a_aligned: bool, per_token: int, scale_aligned: bool, q_scale_aligned: bool) -> tuple:
        # What Triton specializes on among the arguments that change between calls (triton_launch); the
        # output is a fresh allocation (512-byte aligned), the per-token scales too, a static scale may
        # be a slice of a per-group tensor.
        return (out_dtype, m == 1, m % 16 == 0, m_bucket(m), a_aligned, per_token, scale_aligned, q_scale_aligned)

    def bound(self, m: int, out_dtype, per_token: bool, scale_aligned: bool):
        """``launch(stream, a_q, a_scale, out)`` for M rows of aligned, contiguous codes (a quantizer's output)
        on CUDA, through the C launcher Triton's first call at that key left; None where there is none or
        where ``run`` does something else (empty problems, 32-bit limits, gelu_quant). Arguments as ``run``'s."""
        k, n = self.k, self.n
        if self.gelu_quant or m == 0 or n == 0 or k == 0 or max(m * k, n * k, m * n) > _MAX_INT32:
            return None
        w_scale = self.w_scale
        per_token = int(per_token and m != 1)   # as run(): one row's scale is read like a static one
        key = self._key(out_dtype, m, True, per_token, per_token or scale_aligned, w_scale.data_ptr() % 16 == 0)
        record = self.launcher.learned(key)
        if record is None:
            return None
        meta, c_launch = record.meta, record.c_launch
        bias = self.bias if self.bias is not None else w_scale
        smooth = self.q_smooth if self.q_smooth is not None else w_scale
        sms, bucket = self.sms, m_bucket(m)
        gx = self._programs(m, meta)
        if self.use_tma:
            box, weight, Tma = (meta["BLOCK_M"], meta["BLOCK_K"]), self.weight_descs.get(meta), triton_launch.Tma
            shape, strides = (m, k), (k, 1)

            def launch(stream, a_q, a_scale, out):
                c_launch(gx, 1, 1, stream, (Tma(a_q, shape, strides, box), weight, out, a_scale, w_scale, bias,
                                            smooth, w_scale, m, n, k, bucket, sms, k, k, n, per_token))
        else:
            weight = self.qweight

            def launch(stream, a_q, a_scale, out):
                c_launch(gx, 1, 1, stream, (a_q, weight, out, a_scale, w_scale, bias, smooth, w_scale,
                                            m, n, k, bucket, sms, k, k, n, per_token))
        return launch


def w8a8_gemm(a_q: torch.Tensor, a_scale: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor,
              bias: torch.Tensor | None, out_dtype: torch.dtype,
              gelu_quant: tuple[torch.Tensor | None, torch.Tensor] | None = None) -> torch.Tensor:
    """int8 [M, K] x int8 [N, K]^T, dequantized: a_scale is [M] (per token) or [1] (static). One-shot
    (prepares the weight side per call; plans keep a ``W8A8Gemm``).

    ``gelu_quant=(smooth, static_scale)`` of the *next* layer: the epilogue applies GELU (tanh)
    and quantizes for that layer, returning int8 [M, N] codes (scale: static_scale) instead of
    ``out_dtype`` values; torch_ref.gelu_tanh_quantize is the reference.
    """
    if a_q.dtype != torch.int8 or a_q.dim() != 2:
        raise ValueError(f"a_q must be int8 [M, K], got {a_q.dtype} {tuple(a_q.shape)}")
    _check_weight(qweight, w_scale, bias, a_q.shape[1])
    with registry.one_call_plans():     # made for this call: no direct launch to learn (triton_launch.Launcher)
        if gelu_quant is None:
            gemm, q_scale = W8A8Gemm(qweight, w_scale, bias), None
        else:
            q_smooth, q_scale = gelu_quant
            gemm = W8A8Gemm(qweight, w_scale, bias, gelu_quant=True, q_smooth=q_smooth)
    return gemm(a_q, a_scale, out_dtype, q_scale)
