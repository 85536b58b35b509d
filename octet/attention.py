"""INT8 attention for any ComfyUI model: the ``optimized_attention_override`` Octet puts in a MODEL's
transformer_options, so every attention call the host makes through ``optimized_attention`` (Flux, SD3, Wan, a
UNet's blocks, Octet's own lean blocks and Wan q/k path) runs q·kᵀ in int8 (kernels/backends/triton_attention.py).

ComfyUI 0.3.75 and 0.29 both wrap their attention functions in ``wrap_attn``, which calls
``transformer_options["optimized_attention_override"](func, *args, **kwargs)`` with ``func`` the attention the
host chose (SDPA, sage, flash, ...). A call the kernel does not take goes to ``func`` unchanged, logged once with
the reason: a mask, grouped-query attention, a head_dim over 128 or not a multiple of 8, fp32, a CPU tensor, an
argument this module does not know. Under torch.compile the kernel is the ``octet::attention_int8`` custom op (one
opaque node).
"""
from __future__ import annotations

import torch

from ..kernels import ops, registry

OPTION = "optimized_attention_override"
# The keyword arguments the hosts' attention functions take that this path understands (wrap_attn adds the last).
_KNOWN = frozenset({"heads", "mask", "attn_precision", "skip_reshape", "skip_output_reshape", "scale",
                    "transformer_options", "enable_gqa", "_inside_attn_wrapper"})


class Int8Attention:
    """The override: ``self(func, q, k, v, heads, **kwargs)`` as wrap_attn calls it. ``smooth_k`` subtracts k's
    mean over tokens before rounding (exact for softmax; see triton_attention)."""

    graph_safe = True       # CUDA Graph Step may capture it (nodes/graph_step.py keys graphs on its repr)

    def __init__(self, smooth_k: bool = True):
        self.smooth_k = smooth_k

    def __repr__(self):
        return f"Int8Attention(smooth_k={self.smooth_k})"

    def __call__(self, func, *args, **kwargs):
        views = self._views(args, kwargs)
        if isinstance(views, str):
            registry.log_once(f"attention-int8:{views}", f"Octet INT8 attention: {views}: this call runs the "
                              "host's attention (logged once per reason).")
            return func(*args, **kwargs)
        q, k, v, scale = views
        if ops.compiling():
            out = torch.ops.octet.attention_int8(q, k, v, scale, self.smooth_k)
        else:
            from ..kernels.backends import triton_attention
            out = triton_attention.attention(q, k, v, scale, self.smooth_k)
        if kwargs.get("skip_output_reshape", False):
            return out.transpose(1, 2)                         # [B, H, S, D], as the host's SDPA path returns
        return out.flatten(2)                                  # [B, S, H * D]

    @staticmethod
    def _views(args: tuple, kwargs: dict):
        """(q, k, v as [B, S, H, D] views, the call's scale or None) or why the kernel does not take this call."""
        if len(args) < 3 or len(args) + ("heads" in kwargs) < 4 or len(args) > 4:
            return "positional arguments beyond (q, k, v, heads)"
        unknown = set(kwargs) - _KNOWN
        if unknown:
            return f"argument {sorted(unknown)[0]!r}"
        if kwargs.get("mask") is not None:
            return "an attention mask"
        if kwargs.get("enable_gqa"):
            return "grouped-query attention"
        q, k, v = args[:3]
        heads = args[3] if len(args) == 4 else kwargs["heads"]
        if not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
            return "q/k/v not tensors"
        if kwargs.get("skip_reshape", False):
            if q.dim() != 4 or q.shape[1] != heads:
                return f"q of shape {tuple(q.shape)} with skip_reshape (expected [B, {heads}, S, D])"
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        else:
            if q.dim() != 3 or q.shape[-1] % heads:
                return f"q of shape {tuple(q.shape)} for {heads} heads"
            d = q.shape[-1] // heads
            # [B, S, H * D], or [B, S, H, D] already (SD3's joint blocks hand v over so; the host views both alike)
            split = [t.unflatten(-1, (heads, d)) if t.dim() == 3 and t.shape[-1] == heads * d else
                     t if t.dim() == 4 and tuple(t.shape[2:]) == (heads, d) else None for t in (q, k, v)]
            if split[1] is None or split[2] is None:
                return f"k/v of shapes {tuple(k.shape)}/{tuple(v.shape)} for q's {heads}x{d}"
            q, k, v = split
        from ..kernels.backends import triton_attention
        why = triton_attention.refusal(q, k, v)
        if why is not None:
            return why
        scale = kwargs.get("scale")
        return q, k, v, (None if scale is None else float(scale))     # None: the kernel's 1/sqrt(head_dim)


def install(patcher, smooth_k: bool = True):
    """A clone of ``patcher`` whose attention calls go through Int8Attention; an override already there (another
    pack's) is kept and this one is not installed: returns (clone, installed)."""
    clone = patcher.clone()
    options = clone.model_options.setdefault("transformer_options", {})
    if OPTION in options and not isinstance(options[OPTION], Int8Attention):
        return clone, False
    options[OPTION] = Int8Attention(smooth_k)
    return clone, True
