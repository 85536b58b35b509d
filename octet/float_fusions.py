"""Float ops that the host runs as several passes, each as one kernel launch pair: a UNet's GroupNorms (with the
SiLU after them in a ResBlock) and its transformer blocks' GEGLU gate.

INT8 does not touch these ops, so once the GEMMs and convs are INT8 they are a growing share of the step. SDXL
at 1024² (H200 profile, docs/bench/e2e_h200_2026-12-02_profile_sd35_sdxl.json): 46 host GroupNorms at 67 us each
(3.1 ms of a ~24 ms step; PyTorch reduces each (sample, group) in one block, 32 blocks at batch 1), a SiLU pass
after 35 of them, and in 70 GEGLUs a GELU pass and a multiply pass (2.8 ms). Quantize Model and Load Quantized
install these with the INT8 layers; float models get them with ``install`` (the e2e bench reports them apart
from INT8's own gain, variant ``bf16_octet_fused``). Kernels: kernels/backends/triton_groupnorm.py,
triton_geglu.py.

Replacement forwards, object patches like octet/deferred.py's (host code untouched):
  * ``GroupNormForward`` on every GroupNorm module;
  * ``GroupNormSiLUForward`` on a ``Sequential(GroupNorm, SiLU, ...)`` (a ResBlock's ``in_layers`` and
    ``out_layers``, the UNet's ``out``): GroupNorm + SiLU in the kernels, then the rest of the Sequential.
    Code that slices the Sequential (an up/down ResBlock's ``in_layers[:-1]``) reaches the patched GroupNorm
    and the host's SiLU;
  * ``GegluForward`` on every GEGLU: its ``proj`` as the host runs it (INT8 or not), then the gate in one pass;
  * ``NormModulateForward`` on every Wan block's ``norm1``: the LayerNorm and the block's modulation after it in
    one pass (Wan 2.1 1.3B at 832x480x33: 46 + 67 us a block on an H200, 3.4 ms a step, for one ~45 us pass).
Anything the kernels do not take (CPU without the interpreter, torch.compile, autograd, the host's per-call
weight casting under lowvram, a LoRA-style weight function, another layout) computes the host's ops.
``OCTET_FLOAT_FUSIONS=0`` turns them off, ``=1`` on (read per call); unset, they are on except under Triton's
CPU interpreter, where one GroupNorm costs about a second (every program runs in numpy): the CPU tests of
whole UNets would take hours, so the tests that check these paths set it.
"""
from __future__ import annotations


import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels import switches
from ..kernels.backends import triton_support
from .deferred import (ModuleForward, PendingNorm, _is_plain_layer_norm, _tracked, kernel_input, module_forwards,
                       set_forwards)


def enabled() -> bool:
    value = switches.read("OCTET_FLOAT_FUSIONS")
    return not triton_support.interpreting() if value is None else value != "0"


def _may_fuse(x: torch.Tensor, *params) -> bool:
    """The kernels' common conditions: a plain tensor where they run, nothing compiled or tracked by autograd."""
    return enabled() and kernel_input(x) and not _tracked(x, *params)


class FusedForward(ModuleForward):
    """A replacement ``forward`` that runs one module's float ops in the fused kernels (held weakly, as every
    ``ModuleForward``). Each keeps its call site's kernel objects, whose bound calls are this site's (host time:
    kernels/backends/triton_groupnorm.py ``GroupNorm``)."""

    def __init__(self, module: nn.Module):
        super().__init__(module)
        self._kernels: dict = {}

    def _group_norm(self, norm: nn.Module, x: torch.Tensor, silu: bool):
        """GroupNorm (+ SiLU) of ``x`` in the kernels, or None where they do not take it (the host's ops then)."""
        if not isinstance(norm, nn.GroupNorm):
            return None
        params = norm._parameters   # not norm.weight: nn.Module.__getattr__ on every call
        weight, bias = params.get("weight"), params.get("bias")
        if not _may_fuse(x, weight, bias):
            return None
        # The host's cast path (lowvram, manual_cast, weight patches) moves or changes the weights per call.
        if getattr(norm, "comfy_cast_weights", False) or getattr(norm, "weight_function", None) \
                or getattr(norm, "bias_function", None):
            return None
        key = (norm.num_groups, norm.eps, silu)
        kernel = self._kernels.get(key)
        if kernel is None:
            from ..kernels.backends import triton_groupnorm
            kernel = self._kernels[key] = triton_groupnorm.GroupNorm(norm.num_groups, norm.eps, silu)
        return kernel(x, weight, bias)


class GroupNormForward(FusedForward):
    """A GroupNorm module's forward."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        norm = self.module
        y = self._group_norm(norm, x, silu=False)
        return y if y is not None else type(norm).forward(norm, x)


class GroupNormSiLUForward(FusedForward):
    """The forward of a ``Sequential(GroupNorm, SiLU, rest...)``."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        seq = self.module
        layers = list(seq._modules.values())
        h = self._group_norm(layers[0], x, silu=True) if len(layers) >= 2 and type(layers[1]) is nn.SiLU else None
        if h is None:
            return nn.Sequential.forward(seq, x)
        for layer in layers[2:]:
            h = layer(h)
        return h


class GegluForward(FusedForward):
    """A GEGLU's forward: ``x, gate = proj(h).chunk(2, -1); x * gelu(gate)`` with the gate in one kernel."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        h = self.module.proj(x)
        if _may_fuse(h):
            kernel = self._kernels.get("geglu")
            if kernel is None:
                from ..kernels.backends import triton_geglu
                kernel = self._kernels["geglu"] = triton_geglu.Geglu()
            out = kernel(h)
            if out is not None:
                return out
        x, gate = h.chunk(2, dim=-1)     # the host's GEGLU.forward after its proj
        return x * F.gelu(gate)


class NormModulateForward(FusedForward):
    """Wan's ``norm1`` (a LayerNorm without affine, whose block modulates its output before the self-attention reads
    it): a pending LayerNorm (octet/deferred.py PendingNorm) that the block's ``addcmul(e0, norm1(x), 1 + e1)``
    joins, computed in one kernel pass where the self-attention reads it (kernels/backends/triton_layernorm.py),
    instead of the host's LayerNorm pass and modulation pass. Anything else that reads it gets the same values
    (the kernel's, or the host's ops where the kernel does not take the modulation)."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        norm = self.module
        if _may_fuse(x):
            kernel = self._kernels.get("norm")
            if kernel is None:
                from ..kernels.backends import triton_layernorm
                kernel = self._kernels["norm"] = triton_layernorm.NormModulate()
            if kernel.takes(x):
                return PendingNorm(x, norm.eps, kernel=kernel)
        return type(norm).forward(norm, x)


FORWARDS = (GroupNormForward, GroupNormSiLUForward, GegluForward, NormModulateForward)


def _is_geglu(m: nn.Module) -> bool:
    return (type(m).__name__ == "GEGLU" and type(m).__module__.startswith("comfy.")
            and isinstance(getattr(m, "proj", None), nn.Module))


def is_wan_block(m: nn.Module) -> bool:
    """A Wan attention block (its subclasses too) whose norm1 is a LayerNorm without affine."""
    return (type(m).__module__.endswith("ldm.wan.model") and "self_attn" in m._modules
            and _is_plain_layer_norm(m._modules.get("norm1")))


def sites(model: nn.Module) -> dict[str, type]:
    """{module name: forward class}: every GroupNorm of ``model``, every Sequential that starts with a GroupNorm
    and a SiLU, every host GEGLU, every Wan block's norm1."""
    found = {}
    for name, module in model.named_modules():
        if is_wan_block(module):
            found[f"{name}.norm1" if name else "norm1"] = NormModulateForward
        if isinstance(module, nn.GroupNorm):
            found[name] = GroupNormForward
        elif isinstance(module, nn.Sequential) and len(module) >= 2 and isinstance(module[0], nn.GroupNorm) \
                and type(module[1]) is nn.SiLU:
            found[name] = GroupNormSiLUForward
        elif _is_geglu(module):
            found[name] = GegluForward
    return found


def forwards(model: nn.Module) -> dict[str, FusedForward]:
    """The replacement forward per site (api.quantize_ adds them to its object patches)."""
    return module_forwards(model, sites(model))


def install(model: nn.Module) -> list[str]:
    """In place (a float model, or a loaded checkpoint): every site of ``model``."""
    return set_forwards(model, forwards(model))
