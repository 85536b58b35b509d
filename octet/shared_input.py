"""INT8 linears that read one input, run as one GEMM: an attention's q/k/v (self-attention) or its k/v (cross-
attention, both from the context).

Why: an eager ComfyUI step is host-bound (docs/BENCHMARKS.md): every layer call costs the host ~15-25 us of
Python, dispatch and launch whatever its size, and SDXL's 70 transformer blocks call to_q, to_k and to_v of
their self-attention on one tensor and to_k and to_v of their cross-attention on one context: 210 of its ~750
linear calls per step repeat a GEMM's input. One GEMM on the three weights side by side ([3n, k]) does the
same work with one call, and its output's column blocks are q, k and v (views, no copy).

How, without touching the host's attention code (it differs between ComfyUI versions and models): the first
layer of a ``Group`` (the leader) computes every member's output on its call, returns its own block and keeps
the others with the input they belong to; each other member, called next on that same tensor object (the host's
``context = default(context, x)`` passes it on), takes its block. Any other input (another tensor, one written
in place since) runs the member's own plan, so results never depend on the call order being the expected one.
A group learns: when a leader's kept blocks are not taken (Wan's cross-attention calls q on x and k/v on the
context, which have the same width), the leader leaves the group and the rest fuse among themselves.

The fused layer is a QuantLinear of the members' int8 weights and scales concatenated, with its own plans (the
cost model sees N = 3n, where INT8 can pay though each member's n does not). Only layers of one mode with the
speed goal (the memory goal would not pay a second copy of the int8 weights; VRAM: ``octet.modules.plan_summary``
counts it), no SmoothQuant divisor (each layer's is folded into its own weights and divides the input
differently), static ones only where their calibrated scales are equal (calibration sees one input, so q/k/v
agree), no per-call weight patch, their weights on the input's device, outside torch.compile and autograd.
"""
from __future__ import annotations

import logging
import weakref
from typing import Optional

import torch
import torch.nn as nn

from ..kernels import switches, vram
from .modules import QuantLinear, _version, plan_summary

log = logging.getLogger("octet")

# Attribute names of projections that share an input, per host attention class: ComfyUI's CrossAttention
# (SD1.x/SDXL/SVD...) and Wan's attentions (k_img/v_img: image cross-attention of its I2V models).
_SITES = (("to_q", "to_k", "to_v"), ("q", "k", "v"), ("k_img", "v_img"))


class _Kept:
    """A leader's blocks for the other members: valid for ``source`` at ``version``."""
    __slots__ = ("source", "version", "parts")

    def __init__(self, source, version, parts):
        self.source, self.version, self.parts = source, version, parts


class Group:
    """Linears called on one tensor, in order; the first computes all of them (held weakly, as the layers own
    the group: a strong reference back would be a cycle that keeps a dropped model's VRAM alive)."""

    def __init__(self, members):
        self._members = [weakref.ref(m) for m in members]
        self._fused = None      # (members' weight tensors, scales, biases), QuantLinear of them concatenated
        self._ready = None      # what the leader's hot path checks per call (_lead)
        self._kept: Optional[_Kept] = None

    @property
    def members(self) -> list:
        return [r() for r in self._members]

    def invalidate(self) -> None:
        """Drop the fused layer (a member's weights were replaced, written or moved: octet.modules.invalidate)."""
        self._fused = self._ready = self._kept = None

    def forward(self, layer, x: torch.Tensor):
        """``layer``'s output for ``x`` through the group, or None where ``layer`` should run its own plan."""
        if self._members[0]() is layer:
            return self._lead(x)
        kept = self._kept
        if kept is None:
            return None
        if kept.source is not x or kept.version != _version(x):
            self._missed()
            # The rest, if still a group, leads from this very call: their first call computes what every
            # later one will (the fused GEMM), as the leader's does (pinned in _missed).
            return self._lead(x) if self._members and self._members[0]() is layer else None
        part = kept.parts.pop(layer, None)
        if not kept.parts:
            self._kept = None
        return part

    def _missed(self) -> None:
        """A member was called on another input than the leader's: the leader does not share its input with
        the rest (Wan's cross-attention: q on x, k/v on the context of the same width). It leaves; two or more
        others go on fusing among themselves."""
        kept, ready = self._kept, self._ready
        self._kept = self._fused = self._ready = None
        leader, *rest = self._members
        # The leader's output of this call came from the fused layer's plan; its own plan at that signature
        # runs on the same backend, so the next calls give the same numbers (on an H200, Wan's cross-attention
        # q alone would have planned the float path where the fused q/k/v ran INT8: a prompt's first step
        # differed from the same step of its re-run).
        plan = ready[2]._cached_plan(kept.source) if kept is not None and ready is not None else None
        lead = leader()
        if plan is not None and lead is not None:
            lead.pin_backend(kept.source, plan.impl.name)
        self._members = rest if len(rest) >= 2 else []      # one layer alone has nothing to fuse with
        for ref in [leader] + ([] if self._members else rest):
            layer = ref()
            if layer is not None:
                layer.fused_group = None
        log.debug("octet: a linear's input is not the next ones'; it no longer computes them (%d left to fuse)",
                  len(self._members))

    def _lead(self, x: torch.Tensor):
        ready = self._ready
        if ready is not None and type(x) is torch.Tensor and not x.requires_grad:
            # The hot path (an eager step is host-bound): what _fusable and _fused_layer checked holds until a
            # member invalidates (set_weight, a move, new scales or mode), except what the host changes
            # directly: its weight or bias tensor replaced or written in place (a version None: an inference
            # tensor, which has no write counter), a per-call patch added.
            tensors, versions, layer, sizes = ready
            members = []
            for ref, (w, b), (wv, bv) in zip(self._members, tensors, versions):
                m = ref()
                params = m._parameters if m is not None else None
                if params is None or m.weight_function or m.bias_function or params["weight"] is not w \
                        or params.get("bias") is not b or (wv is not None and w._version != wv) \
                        or (bv is not None and b._version != bv):
                    break
                members.append(m)
            else:
                return self._run(layer, members, sizes, x)
        members = self.members
        self._ready = None
        if type(x) is not torch.Tensor or any(m is None for m in members) or not _fusable(members, x):
            return None
        fused = self._fused_layer(members)
        if fused is None:
            return None
        tensors = tuple((m._parameters["weight"], m._parameters.get("bias")) for m in members)
        self._ready = (tensors, tuple((_write_count(w), _write_count(b)) for w, b in tensors), fused,
                       [m.out_features for m in members])
        return self._run(fused, members, self._ready[3], x)

    def _run(self, fused, members, sizes, x: torch.Tensor):
        parts = fused.forward(x).split_with_sizes(sizes, -1)   # not .split: its Python wrapper costs 2 us more
        self._kept = _Kept(x, _version(x), dict(zip(members[1:], parts[1:])))
        return parts[0]

    def _fused_layer(self, members):
        """The members as one QuantLinear, made again when any member's tensors changed; None where static members'
        activation scales differ (each layer then runs its own plan)."""
        key = tuple((m._parameters["weight"], _version(m._parameters["weight"]), m.current_weight_scale(),
                     m._parameters.get("bias"), -2 if m.bias is None else _version(m.bias),
                     m._buffers.get("input_scale"), m.group_selector) for m in members)
        cached = self._fused
        if cached is not None and _unchanged(cached[0], key):
            return cached[1]
        first = members[0]
        if first.act == "static" and not all(
                m.input_scale is not None and m.group_selector is first.group_selector
                and torch.equal(m.input_scale, first.input_scale) for m in members):
            # Calibration records one input's range per layer, so q/k/v normally agree; a file or a
            # recalibration can make them differ, and one GEMM has one activation scale.
            self._fused = (key, None)
            return None
        if not _room_for_copy(members):
            # The fused weight is the members' int8 weights once more: not where it would leave less than ComfyUI's
            # inference reserve free: each member runs its own plan, from this first call on.
            self._fused = (key, None)
            return None
        weight = torch.cat([m.weight for m in members])
        # A merged LoRA's scales stay where the merge made them (the legacy patcher merges on the CPU, then
        # moves the module): bring every member's to the weights' device.
        scale = torch.cat([m.current_weight_scale().reshape(-1, 1).to(weight.device) for m in members])
        bias = None
        if any(m.bias is not None for m in members):
            dtype = next(m.bias.dtype for m in members if m.bias is not None)
            bias = torch.cat([m.bias.to(weight.device, dtype) if m.bias is not None
                              else torch.zeros(m.out_features, dtype=dtype, device=weight.device) for m in members])
        fused = QuantLinear(weight, scale, bias, first.act, first.backend, first.goal)
        if first.act == "static":
            fused.set_static_scales(first.input_scale, first.group_selector)
        self._fused = (key, fused)
        return fused

    def fused_bytes(self) -> int:
        """VRAM of the fused layer: its int8 weights and what its plans keep (their float copies)."""
        if self._fused is None or self._fused[1] is None:
            return 0            # not fused (yet, or for good: static scales that differ, no room)
        layer = self._fused[1]
        own = sum(t.numel() * t.element_size() for t in (layer.weight, layer.weight_scale, layer.bias)
                  if t is not None)
        return own + plan_summary(nn.ModuleDict({"fused": layer}))["extra_bytes"]


def _write_count(t: Optional[torch.Tensor]) -> Optional[int]:
    """A tensor's in-place write counter, None where there is nothing to compare (no tensor, an inference tensor)."""
    return None if t is None or t.is_inference() else t._version


def _room_for_copy(members) -> bool:
    return vram.leaves_reserve(members[0].weight.device,
                               sum(m.weight.numel() * m.weight.element_size() for m in members))


def _unchanged(old: tuple, new: tuple) -> bool:
    """Per member: tensors, scales and selectors the same objects, in-place write counters the same values."""
    return len(old) == len(new) and all(
        all(u == v if isinstance(u, int) else u is v for u, v in zip(a, b)) for a, b in zip(old, new))


def _fusable(members, x: torch.Tensor) -> bool:
    # Not under torch.compile: QuantLayer.forward takes the custom op before it asks the group.
    first = members[0]
    if torch.is_grad_enabled() and x.requires_grad:
        return False
    for m in members:
        if m.act != first.act or m.goal != "speed" or m.backend != first.backend or m.pre_quant_scale is not None \
                or m.weight_function or m.bias_function or m._parameters["weight"].device != x.device \
                or m.in_features != x.shape[-1]:
            return False
    return True


def _is_member(layer) -> bool:
    return isinstance(layer, QuantLinear) and layer.goal == "speed" and layer.pre_quant_scale is None


def groups(model: nn.Module, replacements: Optional[dict] = None) -> list[list[str]]:
    """[[member names]] of ``model`` (with ``replacements``, by name, in place of its modules): attentions'
    q/k/v that are INT8 linears of one mode and input width (speed goal, no SmoothQuant divisor), else their k/v."""
    replacements = replacements or {}
    found = []
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        for attrs in _SITES:
            if not all(isinstance(module._modules.get(a), nn.Module) for a in attrs):
                continue
            layers = [replacements.get(prefix + a, module._modules[a]) for a in attrs]
            names = [prefix + a for a in attrs]
            if len(attrs) == 3 and not all(_is_member(m) and m.in_features == layers[0].in_features for m in layers):
                layers, names = layers[1:], names[1:]      # cross-attention: k and v read the context
            if all(_is_member(m) for m in layers) and layers[0].in_features == layers[1].in_features \
                    and layers[0].act == layers[1].act:
                found.append(names)
    return found


def enabled() -> bool:
    """``OCTET_SHARED_INPUT=0`` quantizes without groups (read when a model is quantized or loaded)."""
    return switches.on("OCTET_SHARED_INPUT")


def attach(model: nn.Module, replacements: Optional[dict] = None) -> list[list[str]]:
    """Give every group's layers (``replacements`` by name where given) their ``Group``; returns the groups."""
    if not enabled():
        return []
    replacements = replacements or {}
    found = groups(model, replacements)
    for names in found:
        layers = [replacements.get(n) or model.get_submodule(n) for n in names]
        group = Group(layers)
        for layer in layers:
            layer.fused_group = group
    return found
