"""Octet's layers under ComfyUI >= 0.29's dynamic VRAM (``ModelPatcherDynamic``, its default on NVIDIA).

The dynamic patcher stages every module that has ``comfy_cast_weights`` through comfy-aimdo's virtual buffers,
which only comfy.ops' casts read and which stay resident between prompts. Octet's layers are not comfy.ops
(int8 weights, their own scales), so they load *whole*, as the host loads any plain module
(``QuantLayer.load_whole``). Two things the host then does not do for them are done here:

- **LoRA.** The host merges weight patches only into the modules it stages. An Octet layer's patches are merged
  at the end of the load, as the legacy patcher's full load merges them (into the float weight, re-quantized).
- **No copy per prompt.** Every prompt's sampler calls ``load_models_gpu``, and the dynamic patcher's ``load``
  first puts every whole-loaded tensor's CPU original back, then copies it over again: for an Octet model that
  is the whole int8 model each prompt (SDXL on an H200: 1.27 s of a 3.2 s prompt). Tensors this model loaded
  before, still on the device, with the same patches, are kept (the host still counts them): the Octet layers'
  and also the small modules' the host always loads whole (norms), so that the tensors a CUDA graph captured
  stay where they are and the graph step replays across prompts (aimdo stages none of an Octet model's modules).

The patcher's class is swapped for a subclass that adds this to ``load``: the host's ``clone`` builds clones of
the same class, so a LoRA applied downstream keeps it. Nothing else of the host's loader changes; an unload
(or a partial one under memory pressure) still puts the CPU tensors back and frees the GPU ones.
"""
from __future__ import annotations

import torch

from ..octet.modules import QuantLayer


def install(patcher, layers) -> None:
    """Make the dynamic-VRAM ``patcher`` load ``layers`` (its object patches) as above."""
    for layer in layers:
        if isinstance(layer, QuantLayer):
            layer.load_whole()      # aimdo's staged weights are for comfy.ops only (octet/modules.py)
    if not isinstance(patcher, KeepsLoadedLayers):
        patcher.__class__ = _subclass(type(patcher))


_SUBCLASSES: dict = {}


def _subclass(base: type) -> type:
    cls = _SUBCLASSES.get(base)
    if cls is None:
        cls = _SUBCLASSES[base] = type(f"Octet{base.__name__}", (KeepsLoadedLayers, base), {"__module__": __name__})
    return cls


class KeepsLoadedLayers:
    """Mixed in before the host's dynamic patcher class (see the module docstring)."""

    def load(self, device_to=None, *args, **kwargs):
        # 0.29: load(device_to, lowvram_model_memory, force_patch_weights, full_load, dirty); partially_load passes
        # dirty=True when the patches changed since the last load (another clone, a LoRA added or removed).
        dirty = kwargs.get("dirty", args[3] if len(args) > 3 else False)
        kept = {} if dirty or device_to is None else _take_loaded(self, device_to)
        try:
            super().load(device_to, *args, **kwargs)
            merge_patches(self, device_to, skip=kept)
        finally:
            for (kind, key), (backup, tensor) in kept.items():
                # The host wrapped a kept tensor in a new Parameter (an Octet layer's: same storage) or, for the
                # small modules it always force-loads, cast the CPU original again (same values: no patches on
                # them). The loaded object goes back in place: the layers' plans and a merged LoRA's scales are
                # keyed on it, and a CUDA graph captured on it stays valid. The backup is the CPU original.
                module, name = _owner(self.model, key)
                slots = getattr(module, "_parameters" if kind == "param" else "_buffers", {})
                now = slots.get(name)
                if now is not None and now.shape == tensor.shape and now.dtype == tensor.dtype \
                        and now.device == tensor.device:
                    slots[name] = tensor
                (self.backup if kind == "param" else self.backup_buffers)[key] = backup


def _owner(model, key: str):
    """(module, attribute name) of ``key`` ("diffusion_model.x.y.weight"); module None if there is none."""
    path, _, name = key.rpartition(".")
    module = model
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            break
    return module, name


def _param_owner(model, key: str):
    """``_owner`` if that module is an Octet layer, else (None, name)."""
    module, name = _owner(model, key)
    return (module, name) if isinstance(module, QuantLayer) else (None, name)


def _same_storage(a, b) -> bool:
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.device == b.device
            and a.dtype == b.dtype and a.shape == b.shape and a.data_ptr() == b.data_ptr())


def _on_device(t: torch.Tensor, device) -> bool:
    device = torch.device(device)
    if t.device.type != device.type:
        return False
    if device.type != "cuda" or device.index is None or t.device.index is None:
        return True
    return t.device.index == device.index


def _take_loaded(patcher, device_to) -> dict:
    """Take out of the host's backups the tensors this model loaded (the backup is another tensor) that are still
    on ``device_to``: (kind, key) -> (backup, the loaded tensor). The host's restore then leaves them in place, and
    its load finds them on the device (``Tensor.to`` hands them back: no copy). Not a host module's weight with
    patches: the host merges those at each load from the backup (Octet's are merged by ``merge_patches``)."""
    kept = {}
    for kind, backups in (("param", patcher.backup), ("buffer", patcher.backup_buffers)):
        for key in list(backups):
            module, name = _owner(patcher.model, key)
            if module is None:
                continue
            tensor = (module._parameters if kind == "param" else module._buffers).get(name)
            if tensor is None or not _on_device(tensor, device_to):
                continue
            if kind == "param" and key in patcher.patches and not isinstance(module, QuantLayer):
                continue
            backup = backups[key]
            original = backup.weight if kind == "param" else backup
            if getattr(backup, "inplace_update", False) or _same_storage(original, tensor):
                continue   # nothing was copied (or the host copies in place): nothing to keep
            kept[(kind, key)] = (backups.pop(key), tensor)
    return kept


def merge_patches(patcher, device_to, skip=()) -> None:
    """Merge the weight patches (LoRA) of ``patcher``'s Octet layers, which the host just loaded whole, as a full
    load merges them: into the float weight, re-quantized to int8. The host's backup keeps the unpatched weight
    and puts it back at the next load or unload. ``skip``: tensors kept from a load that merged them already."""
    for key in list(patcher.patches):
        if ("param", key) in skip or key not in patcher.backup:
            continue
        module, name = _param_owner(patcher.model, key)
        if module is not None and name in ("weight", "bias"):
            patcher.patch_weight_to_device(key, device_to=device_to)
