"""A model's RoPE table (the host's EmbedND: Flux, Chroma, Lumina, HunyuanVideo...) outside torch.compile's graphs.

Why: in compiled Flux-dev Inductor fuses EmbedND's float64 linspace / pow / outer product / cos / sin / stack into one
kernel that took 1.73 ms of a ~94 ms step on an H100 (docs/BENCHMARKS.md, thirty-second session, from the thirtieth
session's profile), for a table that eager PyTorch builds in small kernels. With ``OCTET_COMPILE_ROPE_TABLE=1``
(read when the model is quantized) each EmbedND's forward, while torch.compile traces it, becomes one
``octet::rope_table`` call (kernels/ops.py): an opaque node whose kernel runs the module's own class forward, so
the table is the host's eager numbers and the compiled graph keeps no graph break. Eager calls run the host's
forward unchanged. The table alone on an H100 (bench/rope_table.py, 2026-12-06): 106.7 us this way against Inductor's
1730.3 (eager 109.8), identical numbers; the compiled step with it is not yet timed (bench/e2e.py variant
``octet_dynamic_rope_table``), so it is off by default.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..kernels import ops, switches
from .deferred import ModuleForward


def is_rope_embedder(module: nn.Module) -> bool:
    """ComfyUI's EmbedND (comfy/ldm/flux/layers.py, both hosts): ids [B, N, axes] -> [B, 1, N, sum(axes_dim) / 2,
    2, 2]."""
    return type(module).__name__ == "EmbedND" and hasattr(module, "theta") and isinstance(
        getattr(module, "axes_dim", None), (list, tuple)) and all(int(a) % 2 == 0 for a in module.axes_dim)


class RopeTableForward(ModuleForward):
    """EmbedND's replacement forward: the host's forward, except while torch.compile traces it (one
    ``octet::rope_table`` call then). The module is registered as the op's owner (held weakly)."""

    def __init__(self, module: nn.Module):
        super().__init__(module)
        self.owner = ops.register_owner(module)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        module = self.module
        if ops.compiling():
            return torch.ops.octet.rope_table(ids, float(module.theta), [int(a) for a in module.axes_dim],
                                              self.owner)
        return type(module).forward(module, ids)


def forwards(model: nn.Module) -> dict[str, RopeTableForward]:
    """The replacement forward of every EmbedND of ``model`` when OCTET_COMPILE_ROPE_TABLE=1, else none."""
    if not switches.is_one("OCTET_COMPILE_ROPE_TABLE"):
        return {}
    return {name: RopeTableForward(m) for name, m in model.named_modules() if is_rope_embedder(m)}
