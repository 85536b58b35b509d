"""Int8 position tables: SD3's position embedding under Quantize Model's memory goal.

SD3/SD3.5 (ComfyUI's MMDiT) keep a fixed position embedding as a buffer, ``pos_embed`` (1, S*S, C), of which
each step uses the centre crop that fits the latent (``cropped_pos_embed``). SD3.5-medium's is 384² x 1536 in
bf16: 0.42 GiB, 9 % of the model, and not a layer's weight, so INT8 layers alone leave the model at 0.547x of
bf16 (docs/BENCHMARKS.md). With ``goal="memory"`` Octet keeps it as int8 codes with one scale per row (per
position) and dequantizes only the crop a step uses (SD3.5 at 1024²: 64² of the 384² rows).

Two object patches, like the INT8 layers' (host code untouched, the source MODEL keeps its bf16 table):
``pos_embed`` -> the int8 codes (the same buffer, so it moves with the model), ``cropped_pos_embed`` ->
``PositionCrop``, which holds the row scales (0.6 MB) and copies them to the codes' device at first use
there (before any CUDA-graph capture: the graph step warms up eagerly first).

Files keep the bf16 table (``dequantized_state``): stock loaders read it, and the scale is chosen so that a
dequantized table quantizes back to the same codes and scales (``quantize_rows``), so save -> load -> save
round-trips exactly.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .deferred import ModuleForward


def quantize_rows(table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes, float32 scale per row) of a 2-D-or-more table, rows along the last dim.

    The scale is the row's absolute maximum *rounded to bf16* over 127, so the row's largest code is +-127
    and dequantizing in bf16 gives back that maximum exactly: quantizing a dequantized table then finds the
    same scale and the same codes (a saved and reloaded model is bit-identical).
    """
    x = table.float()
    amax = x.abs().amax(dim=-1, keepdim=True).to(torch.bfloat16).float()
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    codes = torch.round(x / scale).clamp_(-127, 127).to(torch.int8)
    return codes, scale


def dequantize_rows(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (codes.float() * scale).to(dtype)


def _has_position_table(module: nn.Module) -> bool:
    """ComfyUI's MMDiT (SD3, SD3.5) with a stored table; others compute their position embedding."""
    table = module._buffers.get("pos_embed")
    return (table is not None and table.is_floating_point() and table.dim() == 3 and table.shape[0] == 1
            and isinstance(getattr(module, "pos_embed_max_size", None), int)
            and table.shape[1] == module.pos_embed_max_size ** 2
            and callable(getattr(type(module), "cropped_pos_embed", None)))


class PositionCrop(ModuleForward):
    """Replaces MMDiT.cropped_pos_embed: the host's centre crop, taken from the int8 codes, dequantized."""

    def __init__(self, module: nn.Module, scale: torch.Tensor, dtype: torch.dtype):
        super().__init__(module)
        self.scale = scale          # (1, S*S, 1) float32, on the device the table was quantized on
        self.dtype = dtype          # the table's own dtype: what the host's crop returns
        self._scales = {scale.device: scale}

    def _scale_on(self, device: torch.device) -> torch.Tensor:
        scale = self._scales.get(device)
        if scale is None:
            scale = self._scales[device] = self.scale.to(device)
        return scale

    def dequantized_table(self) -> torch.Tensor:
        """The whole table as the model uses it (what a file stores)."""
        codes = self.module.pos_embed
        return dequantize_rows(codes, self._scale_on(codes.device), self.dtype)

    def __call__(self, hw, device=None) -> torch.Tensor:
        dm = self.module
        codes, size = dm.pos_embed, dm.pos_embed_max_size
        p = dm.x_embedder.patch_size[0]
        h, w = (hw[0] + 1) // p, (hw[1] + 1) // p      # the host's patched size
        if h > size or w > size:
            raise ValueError(f"SD3 position table: a {hw[0]}x{hw[1]} latent is {h}x{w} patches, more than the "
                             f"model's table of {size}x{size}; use a smaller image size.")
        top, left = (size - h) // 2, (size - w) // 2
        rows = slice(top, top + h), slice(left, left + w)
        crop = codes.view(size, size, -1)[rows]
        scale = self._scale_on(codes.device).view(size, size, 1)[rows]
        out = dequantize_rows(crop, scale, self.dtype).reshape(1, h * w, -1)
        return out if device is None else out.to(device)


def patches(model: nn.Module) -> dict[str, object]:
    """Attribute path (relative to ``model``) -> new value, for every stored position table of ``model``."""
    found: dict[str, object] = {}
    for name, m in model.named_modules():
        if not _has_position_table(m):
            continue
        table = m.pos_embed
        codes, scale = quantize_rows(table)
        prefix = f"{name}." if name else ""
        found[prefix + "pos_embed"] = codes
        found[prefix + "cropped_pos_embed"] = PositionCrop(m, scale, table.dtype)
    return found


def install(model: nn.Module) -> list[str]:
    """In place (a loaded checkpoint with the memory goal): every stored position table of ``model``."""
    found = patches(model)
    for path, value in found.items():
        owner, _, attr = path.rpartition(".")
        setattr(model.get_submodule(owner) if owner else model, attr, value)
    return sorted({path.rpartition(".")[0] for path in found})


def crops(model: nn.Module) -> dict[str, PositionCrop]:
    """Module name -> its installed PositionCrop (a model quantized in place or loaded with the memory goal)."""
    return {name: c for name, m in model.named_modules()
            if isinstance(c := m.__dict__.get("cropped_pos_embed"), PositionCrop)}


def dequantized_state(model: nn.Module, state: dict) -> dict:
    """``state`` (model.state_dict()) with each int8 table replaced by its dequantized float table."""
    for name, crop in crops(model).items():
        state[f"{name}.pos_embed" if name else "pos_embed"] = crop.dequantized_table()
    return state


def table_bytes(value) -> int:
    """Bytes one patch value holds (codes, or a crop's scale); 0 for anything else."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, PositionCrop):
        return value.scale.numel() * value.scale.element_size()
    return 0
