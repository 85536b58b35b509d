"""Deferred GELU: the next INT8 layer applies a GELU(tanh), and Flux's cat, while it quantizes.

With dynamic per-token scales an MLP's fc2 input cannot be quantized in fc1's epilogue (the row's
absmax spans every program's columns; fusion.py does that for static scales). What can go is the
float traffic between the two: fc1's output is read by the GELU, written again, read by the
quantization pass. In Flux's 38 single blocks it is worse: linear2's input is
``torch.cat((attn, gelu(mlp)), 2)``, a GELU pass and a cat pass over 15360-wide rows before the
quantization pass reads it a third time. About 19 GB of memory traffic per Flux step at 1024².

So the GELU module's forward (patched like the chain forwards: in place, or as a host object patch)
returns a ``PendingGelu``: a tensor with the GELU output's shape and dtype and no storage, holding
the pre-activation. ``torch.cat((attn, pending), -1)`` gives another PendingGelu holding attn as its
head. The consumer (a QuantLinear whose plan offers ``gelu_input``) hands both to one Triton kernel
(``triton_quant.GeluRowQuantizer``) that reads them in place and writes the int8 row.

The host's block code is not copied or replaced, so host patches inside the block (0.29's
attn1_patch etc.) keep working. Anything other than that cat, or a consumer that cannot take it,
computes the real tensor first (``materialize``: exactly nn.GELU's and torch.cat's numbers), logged
once per function, so a host change can cost speed but never correctness. The GELU defers only when
its consumer already has a plan for this signature that takes the input (so the first call at each
shape, and every CPU, weight-only, LoRA-under-lowvram or torch.compile call, runs as before).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import kernels


def enabled() -> bool:
    """OCTET_DEFERRED_GELU=0 turns it off (for comparisons: bench/e2e.py). Read per call."""
    return os.environ.get("OCTET_DEFERRED_GELU", "1") != "0"


def _metadata_getters() -> frozenset:
    t = torch.Tensor
    return frozenset({t.shape.__get__, t.dtype.__get__, t.device.__get__, t.ndim.__get__, t.is_cuda.__get__,
                      t.requires_grad.__get__, t.layout.__get__, t.size, t.dim, t.numel, t.__len__})


class PendingGelu(torch.Tensor):
    """Stands for ``gelu_tanh(pre)``, or ``cat((head, gelu_tanh(pre)), -1)``, not computed yet. It has
    no storage: reading its metadata is free, every other torch function computes it first."""

    _METADATA = _metadata_getters()
    head: Optional[torch.Tensor]
    pre: torch.Tensor

    @staticmethod
    def __new__(cls, head: Optional[torch.Tensor], pre: torch.Tensor):
        shape = pre.shape if head is None else (*pre.shape[:-1], head.shape[-1] + pre.shape[-1])
        t = torch.Tensor._make_wrapper_subclass(cls, shape, dtype=pre.dtype, device=pre.device)
        t.head, t.pre = head, pre
        return t

    def materialize(self) -> torch.Tensor:
        gelu = F.gelu(self.pre, approximate="tanh")
        return gelu if self.head is None else torch.cat((self.head, gelu), dim=-1)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in cls._METADATA:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        if func is torch.cat:
            joined = _cat_head(*args, **kwargs)
            if joined is not None:
                return joined
        kernels.registry.log_once(f"deferred-gelu:{getattr(func, '__name__', func)}",
                                  f"Octet: a deferred GELU was computed in float for {getattr(func, '__name__', func)} "
                                  f"(expected only torch.cat into an INT8 layer); correct, but not fused.")
        args, kwargs = _materialized(args), _materialized(kwargs)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        # Reached only by paths that skip __torch_function__ (C++ callers): compute, then run.
        return func(*_materialized(args), **_materialized(kwargs or {}))

    def __repr__(self):
        return f"PendingGelu(shape={tuple(self.shape)}, dtype={self.dtype}, head={self.head is not None})"


def _materialized(tree):
    if isinstance(tree, PendingGelu):
        return tree.materialize()
    if isinstance(tree, (list, tuple)):
        return type(tree)(_materialized(t) for t in tree)
    if isinstance(tree, dict):
        return {k: _materialized(v) for k, v in tree.items()}
    return tree


def _cat_head(tensors, dim=0, **kwargs):
    """cat((head, pending), last dim) -> PendingGelu(head, pending.pre): Flux's single block."""
    if kwargs or not isinstance(tensors, (list, tuple)) or len(tensors) != 2:
        return None
    head, pending = tensors
    if type(head) is not torch.Tensor or type(pending) is not PendingGelu or pending.head is not None:
        return None
    pre = pending.pre
    if dim not in (-1, pre.dim() - 1) or head.dim() != pre.dim() or head.shape[:-1] != pre.shape[:-1] \
            or head.dtype != pre.dtype or head.device != pre.device:
        return None
    return PendingGelu(head, pre)


class DeferredGeluForward:
    """The replacement ``forward`` of one GELU(tanh) module whose output feeds ``container.<consumer>``.
    The consumer is looked up at each call, so it follows whatever layer is in place (a host object
    patch, a float layer restored by QAT or sensitivity)."""

    def __init__(self, gelu: nn.GELU, container: nn.Module, consumer: str):
        self.gelu, self.container, self.consumer = gelu, container, consumer

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not kernels.ops.compiling() and enabled():
            layer = self.container._modules.get(self.consumer)
            takes = getattr(layer, "takes_gelu_input", None)
            if takes is not None and type(x) is torch.Tensor and takes(x):
                return PendingGelu(None, x)
        return nn.GELU.forward(self.gelu, x)


def _is_gelu_tanh(m) -> bool:
    return isinstance(m, nn.GELU) and m.approximate == "tanh"


def _consumes(layer) -> bool:
    return getattr(layer, "act", "none") in ("dynamic", "static") and getattr(layer, "kind", None) == "linear"


def sites(model: nn.Module, replacements: dict[str, nn.Module]) -> dict[str, tuple[str, str]]:
    """{GELU module name: (container name, consumer attribute)} for every GELU(tanh) whose output goes
    straight into an INT8-activation linear (or will, per ``replacements``): MLP containers of the
    shapes fusion.chain_parts knows, and Flux single blocks (``mlp_act`` -> cat -> ``linear2``)."""
    from . import fusion   # here, not at the top: fusion imports modules, which imports this module
    found = {}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        parts = fusion.chain_parts(module)
        if parts is not None:
            act_name = "1" if isinstance(module, nn.Sequential) else "act"
            consumer = parts[4]
        elif _is_gelu_tanh(getattr(module, "mlp_act", None)) and isinstance(getattr(module, "linear2", None), nn.Module) \
                and not getattr(module, "yak_mlp", False):
            act_name, consumer = "mlp_act", "linear2"
        else:
            continue
        if _consumes(replacements.get(prefix + consumer, getattr(module, consumer, None))):
            found[prefix + act_name] = (name, consumer)
    return found


def forwards(model: nn.Module, replacements: dict[str, nn.Module]) -> dict[str, DeferredGeluForward]:
    """The deferred forward per GELU site (api.quantize_ adds them to its object patches)."""
    return {gelu: DeferredGeluForward(model.get_submodule(gelu), model.get_submodule(container), consumer)
            for gelu, (container, consumer) in sites(model, replacements).items()}


def install(model: nn.Module) -> list[str]:
    """In place (a loaded checkpoint): defer every GELU site of ``model``."""
    found = forwards(model, {})
    for name, forward in found.items():
        model.get_submodule(name).forward = forward
    return sorted(found)
