"""The one ``torch.library`` custom-op layer: what ``torch.compile`` sees of an INT8 layer.

  octet::linear(x, qweight, w_scale, bias?, smooth?, static_scale?, act, backend, goal) -> x.dtype [..., N]
  octet::conv2d(x, qweight, w_scale, bias?, smooth?, static_scale?, stride, padding, dilation, groups,
                act, backend, goal) -> x.dtype NCHW
  octet::static_mlp(x, fc1 tensors, fc2 tensors, backend) -> x.dtype [..., N2]: fc2(gelu_tanh(fc1(x)))
  octet::linear_fused(x, head?, mult?, shift?, eps, input, gelu_out, res?, gate?, <linear's arguments>)
      -> x.dtype [..., N]: a linear on a deferred input and/or with its GELU in the epilogue, or with a block's
      gated residual added (``res + y * gate``, res's shape and dtype); octet/compile_pass.py puts it in compiled
      graphs in place of the host's float ops around octet::linear
  octet::qk_norm_rope(qs, ks, q weights, k weights, q eps, k eps, freqs, dtype) -> (q, k) [B, H, sum(L_i), D]:
      Flux's QK RMSNorm per stream, the streams' cat and the RoPE (octet/compile_pass.py, in compiled graphs)
  octet::attention_int8(q, k, v, scale, smooth_k) -> q.dtype [B, SQ, H, D]: attention with int8 q·kᵀ
  octet::rope_table(ids, theta, axes_dim, owner) -> fp32 [B, 1, N, sum(axes_dim)/2, 2, 2]: a RoPE table (the
      host's EmbedND) computed by the host module's own forward, opaque to Inductor (octet/rope_table.py)

Each op is declared once with a fake (meta) implementation, so the compiler traces one opaque node
per quantized layer (no graph break at a Triton launch) and ``torch.library.opcheck`` can verify
the declaration. Eager code never goes through these: a Python custom op costs tens of
microseconds of dispatcher time per call, so layers call their cached plan directly
(``octet/modules.py``) and only a traced forward calls the op (``compiling()`` is the one check).

A compiled graph calls the op with a layer's tensors on every step. Planning there on every call
(select a backend, prepare the weight side, and on the speed goal's float path dequantize the weight)
made compiled Octet 0.81x of compiled bf16 on Flux-dev (H200, docs/BENCHMARKS.md). So each layer
registers as the *owner* of its tensors (``register_owner``) and passes its number as the op's last
argument: the op then runs that layer's own cached plan, the one eager uses. Without a live owner
holding the same weight on the input's device (a graph outliving its model, lowvram), the op plans
once for the call, as before.
"""
from __future__ import annotations

import itertools
import weakref
from typing import Optional

import torch

from . import dispatch, torch_ref
from .registry import log_once
from .operands import ConvGeometry

Tensor = torch.Tensor


def compiling() -> bool:
    """True while torch.compile traces: then layers call the custom ops below instead of their plan."""
    return torch.compiler.is_compiling()


def _lookup(qualname: str):
    ns, name = qualname.split("::")
    try:
        packet = getattr(getattr(torch.ops, ns), name)
        packet.default  # noqa: B018 - raises if the op was never defined
        return packet
    except (AttributeError, RuntimeError):
        return None


# The registrations live as long as this Library object: a module global, never collected while the pack is loaded.
_LIBRARY = torch.library.Library("octet", "FRAGMENT")


def define_op(qualname: str, fake):
    """Declare ``fn`` as the op ``qualname`` (schema from its type hints, as ``torch.library.custom_op`` infers
    it), with ``fake`` as its meta kernel and ``fn`` itself as its one kernel for every device.

    Not ``torch.library.custom_op``: a compiled graph calls these ops once per INT8 layer per step, and
    custom_op's Python wrappers (an autograd layer that redispatches, then a per-device lookup) cost 12.4 us a
    call where this one ``CompositeExplicitAutograd`` kernel costs 6.7 (the op's own body stubbed, this
    repository's CPU, bench/compiled_host_cost.py; on an H100 host 25.7 vs 11.3): Flux-dev makes 314 calls a
    step. Inference only: an input that needs grad gets autograd's not-implemented error, as a custom op without a
    formula did.

    ComfyUI may import this pack a second time under another module name (its loader keys modules by
    folder path); redefining a live op swaps its kernels under references the first copy holds, so a second
    copy reuses the op the first one defined (same code, same schema).
    """
    def wrap(fn):
        existing = _lookup(qualname)
        if existing is not None:
            return existing
        name = qualname.split("::")[1]
        _LIBRARY.define(name + torch.library.infer_schema(fn, mutates_args=()))
        _LIBRARY.impl(name, fn, "CompositeExplicitAutograd")
        torch.library.register_fake(qualname, fake, lib=_LIBRARY)
        return _lookup(qualname)
    return wrap


_owners: dict[int, weakref.ref] = {}
_owner_numbers = itertools.count(1)


def register_owner(layer) -> int:
    """A number for ``layer`` (anything with ``.weight`` and ``.plan(x) -> plan with .run(x, static)``; for
    octet::rope_table, the EmbedND module) that the ops below accept as ``owner``; forgotten when it is collected."""
    number = next(_owner_numbers)
    _owners[number] = weakref.ref(layer, lambda _ref, number=number: _owners.pop(number, None))
    return number


def owner_of(number: int, qweight: Tensor, x: Tensor):
    """The live layer registered as ``number`` if it still holds ``qweight`` on x's device, else None."""
    ref = _owners.get(number) if number > 0 else None
    layer = ref() if ref is not None else None
    if layer is None:
        return None
    weight = layer.weight
    if weight is qweight:   # what a compiled graph passes: the layer's own parameter (one identity test per call)
        return layer if qweight.get_device() == x.get_device() else None
    if qweight.device != x.device or weight.device != x.device or weight.data_ptr() != qweight.data_ptr():
        return None
    return layer


def _linear_fake(x, qweight, w_scale, bias, smooth, static_scale, act, backend, goal, owner=-1):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


@define_op("octet::linear", _linear_fake)
def linear(x: Tensor, qweight: Tensor, w_scale: Tensor, bias: Optional[Tensor], smooth: Optional[Tensor],
           static_scale: Optional[Tensor], act: str, backend: str, goal: str, owner: int = -1) -> Tensor:
    layer = owner_of(owner, qweight, x)
    if layer is not None:
        return layer.plan(x).run(x, static_scale)
    return dispatch.linear(x, qweight, w_scale, bias, act=act, smooth=smooth, static_scale=static_scale,
                           backend=backend, goal=goal)


def _linear_fused_fake(x, head, mult, shift, eps, input, gelu_out, res, gate, qweight, w_scale, bias, smooth,
                       static_scale, act, backend, goal, owner=-1):
    return torch.empty_like(res, memory_format=torch.contiguous_format) if res is not None \
        else x.new_empty((*x.shape[:-1], qweight.shape[0]))


@define_op("octet::linear_fused", _linear_fused_fake)
def linear_fused(x: Tensor, head: Optional[Tensor], mult: Optional[Tensor], shift: Optional[Tensor], eps: float,
                 input: str, gelu_out: bool, res: Optional[Tensor], gate: Optional[Tensor], qweight: Tensor,
                 w_scale: Tensor, bias: Optional[Tensor], smooth: Optional[Tensor], static_scale: Optional[Tensor],
                 act: str, backend: str, goal: str, owner: int = -1) -> Tensor:
    """``y = linear(input)``, and ``gelu_tanh(y)`` with ``gelu_out``, where ``input`` says what the layer's input is:
    "plain" ``x``; "gelu" ``cat((head, gelu_tanh(x)), -1)`` (``gelu_tanh(x)`` without a head: Flux's single-block
    linear2 input); "norm" ``addcmul(shift, layer_norm(x, eps), mult)`` (``layer_norm(x, eps)`` without them: a
    DiT's modulated LayerNorm). With ``res`` (not with ``gelu_out``): ``res + y * gate`` as a new tensor, the
    host's in-place ``res += y * gate`` without the mutation (the pass only rewrites one that nothing else sees).
    The owner's plans compute it as eager Octet does (octet/deferred.py's inputs, fusion.py's GELU epilogue:
    QuantLinear.fused_call); without an owner, the host's float ops, then the layer."""
    layer = owner_of(owner, qweight, x)
    if layer is not None:
        return layer.fused_call(x, head, mult, shift, eps, input, gelu_out, static_scale, res, gate)
    if input == "gelu":
        x = torch.nn.functional.gelu(x, approximate="tanh")
        x = x if head is None else torch.cat((head, x), dim=-1)
    elif input == "norm":
        x = torch.nn.functional.layer_norm(x, (x.shape[-1],), None, None, eps)
        x = x if mult is None else torch.addcmul(shift, x, mult)
    y = dispatch.linear(x, qweight, w_scale, bias, act=act, smooth=smooth, static_scale=static_scale,
                        backend=backend, goal=goal)
    if res is not None:
        return gated_residual(y, res, gate)
    return torch.nn.functional.gelu(y, approximate="tanh") if gelu_out else y


def gated_residual(y: Tensor, res: Tensor, gate: Tensor) -> Tensor:
    """The host's ``res += y * gate`` (Flux's residual after proj / linear2 / fc2) as a new contiguous tensor (the
    op's fake says so), the same roundings, ``res`` unchanged."""
    return (res + y * gate).to(res.dtype).contiguous()


def _qk_norm_rope_fake(qs, ks, wqs, wks, eps_q, eps_k, freqs, dtype):
    b, h, _, d = qs[0].shape
    total = sum(q.shape[2] for q in qs)
    return qs[0].new_empty((b, h, total, d), dtype=dtype), qs[0].new_empty((b, h, total, d), dtype=dtype)


@define_op("octet::qk_norm_rope", _qk_norm_rope_fake)
def qk_norm_rope(qs: list[Tensor], ks: list[Tensor], wqs: list[Tensor], wks: list[Tensor], eps_q: list[float],
                 eps_k: list[float], freqs: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Flux's attention inputs: per stream i, ``rms_norm(q_i, w_q_i, eps_q_i).to(dtype)`` (and k's), the streams
    joined along the tokens, then the RoPE with ``freqs`` [B or 1, 1, L, D/2, 2, 2]: one Triton kernel per stream
    (kernels/backends/triton_rope.py) where eager Octet's deferred QKNorm would use it (weights in q's dtype: see
    octet/deferred.py _rms_params), else the host's ops (the RoPE as comfy.ldm.flux.math computes it in fp32)."""
    from .backends import triton_rope, triton_support
    segments = list(zip(qs, ks, wqs, wks, eps_q, eps_k))
    q0 = qs[0]
    if triton_support.runs_on(q0) and freqs.shape[2] == sum(q.shape[2] for q in qs) and all(
            q.shape == k.shape and q.dtype == k.dtype == wq.dtype == wk.dtype and triton_rope.takes(q, wq, freqs)
            and triton_rope.takes(k, wk, freqs) for q, k, wq, wk, _, _ in segments):
        return triton_rope.qk_norm_rope(segments, freqs, dtype)
    log_once("compiled-qk-host", f"Octet: a compiled attention's q/k norm + RoPE ran as the host's ops (the fused "
             f"kernel takes heads of a power-of-two width with norm weights in q's dtype on a GPU; got "
             f"{tuple(q0.shape)} {q0.dtype}, weights {wqs[0].dtype}, {'GPU' if q0.is_cuda else 'CPU'}).")

    def prepared(xs, ws, eps):
        parts = [torch.nn.functional.rms_norm(x, (x.shape[-1],), w, e).to(dtype) for x, w, e in zip(xs, ws, eps)]
        return torch_ref.rope(parts[0] if len(parts) == 1 else torch.cat(parts, dim=2), freqs)
    return prepared(qs, wqs, eps_q), prepared(ks, wks, eps_k)


def _rope_table_fake(ids, theta, axes_dim, owner):
    return ids.new_empty((ids.shape[0], 1, *ids.shape[1:-1], sum(axes_dim) // 2, 2, 2), dtype=torch.float32)


@define_op("octet::rope_table", _rope_table_fake)
def rope_table(ids: Tensor, theta: float, axes_dim: list[int], owner: int) -> Tensor:
    """The RoPE table of ``ids`` [B, N, axes] as the live EmbedND registered as ``owner`` computes it: its class's
    own forward (the host's code, its numbers), run as eager kernels. ``theta`` and ``axes_dim`` are that module's,
    passed for the fake's shape."""
    ref = _owners.get(owner)
    module = ref() if ref is not None else None
    if module is None:
        raise RuntimeError(f"Octet: a compiled graph asked for the RoPE table of module #{owner}, which no longer "
                           f"exists (a compiled model outliving its MODEL); compile the MODEL again")
    return type(module).forward(module, ids)


def _conv2d_fake(x, qweight, w_scale, bias, smooth, static_scale, stride, padding, dilation, groups, act, backend,
                 goal, owner=-1):
    geometry = ConvGeometry.of(stride, padding, dilation, groups)
    oh, ow = geometry.output_size(x.shape[2], x.shape[3], qweight.shape[2], qweight.shape[3])
    return x.new_empty((x.shape[0], qweight.shape[0], oh, ow))


@define_op("octet::conv2d", _conv2d_fake)
def conv2d(x: Tensor, qweight: Tensor, w_scale: Tensor, bias: Optional[Tensor], smooth: Optional[Tensor],
           static_scale: Optional[Tensor], stride: list[int], padding: list[int], dilation: list[int], groups: int,
           act: str, backend: str, goal: str, owner: int = -1) -> Tensor:
    # The fake promises a contiguous NCHW result; backends may return other layouts.
    layer = owner_of(owner, qweight, x)
    if layer is not None:
        return layer.plan(x).run(x, static_scale).contiguous()
    return dispatch.conv2d(x, qweight, w_scale, bias, stride, padding, dilation, groups, act=act, smooth=smooth,
                           static_scale=static_scale, backend=backend, goal=goal).contiguous()


def _static_mlp_fake(x, q1, s1, b1, sm1, sc1, q2, s2, b2, sm2, sc2, backend, owner1=-1, owner2=-1):
    return x.new_empty((*x.shape[:-1], q2.shape[0]))


@define_op("octet::static_mlp", _static_mlp_fake)
def static_mlp(x: Tensor, q1: Tensor, s1: Tensor, b1: Optional[Tensor], sm1: Optional[Tensor], sc1: Tensor,
               q2: Tensor, s2: Tensor, b2: Optional[Tensor], sm2: Optional[Tensor], sc2: Tensor,
               backend: str, owner1: int = -1, owner2: int = -1) -> Tensor:
    fc1, fc2 = owner_of(owner1, q1, x), owner_of(owner2, q2, x)
    if fc1 is not None and fc2 is not None:
        run, _, _ = fc1.chain_plan(fc2, x)
        return run(x, sc1, sc2)
    return dispatch.static_mlp(x, (q1, s1, b1, sm1, sc1), (q2, s2, b2, sm2, sc2), backend=backend)


def _attention_int8_fake(q, k, v, scale, smooth_k):
    return q.new_empty(q.shape)


@define_op("octet::attention_int8", _attention_int8_fake)
def attention_int8(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float], smooth_k: bool) -> Tensor:
    """[B, S, H, D] views in, [B, SQ, H, D] contiguous out (kernels/backends/triton_attention.py)."""
    from .backends import triton_attention
    return triton_attention.attention(q, k, v, scale, smooth_k)
