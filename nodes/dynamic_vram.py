"""Octet's layers under ComfyUI >= 0.29's dynamic VRAM (``ModelPatcherDynamic``, its default on NVIDIA).

The dynamic patcher stages every module that has ``comfy_cast_weights`` through comfy-aimdo's virtual buffers,
which only comfy.ops' casts read and which stay resident between prompts. Octet's layers are not comfy.ops
(int8 weights, their own scales), so they load *whole*, as the host loads any plain module
(``QuantLayer.load_whole``). Four things the host then gets wrong for them are handled here:

- **LoRA.** The host merges weight patches only into the modules it stages. An Octet layer's patches are merged
  at the end of the load, as the legacy patcher's full load merges them (into the float weight, re-quantized).
- **Backups by path.** The host keeps the CPU original of each tensor it loaded whole in a dict shared by every
  clone of the model, keyed by path, and puts them back by path; the dynamic patcher takes the object patches out
  *before* it does. So an Octet layer's int8 original went into the float Linear at its path (the float MODEL of
  the same checkpoint then computed garbage), and a float module's original into an Octet layer. The layers hold
  their originals themselves (never in the shared dict); a float module's backup found at an Octet layer's path
  goes back into that float module before our load.
- **No copy per prompt.** Every prompt's sampler calls ``load_models_gpu``, and the dynamic patcher's ``load``
  first puts every whole-loaded tensor's CPU original back, then copies it over again: for an Octet model that
  is the whole int8 model each prompt (SDXL on an H200: 1.27 s of a 3.2 s prompt). Tensors this model loaded
  before, still on the device, with the same patches, are hidden from the host's load and kept (counted as the
  host counts them): the Octet layers' and also the small modules' the host always loads whole (norms), so that
  the tensors a CUDA graph captured stay where they are and the graph step replays across prompts (aimdo stages
  none of an Octet model's modules). SDXL's per-prompt load: 68 ms, bf16's 146 (H200).
- **Not fitting.** Loading whole, an INT8 model with less free VRAM than its layers ran out of memory where the
  host streams the bf16 model. The layers that do not fit (largest first) stay staged and copy their weight per
  call, decided at each load (``_fit_to_memory``).

The patcher's class is swapped for a subclass that adds this to ``load``, ``unpatch_model``, ``detach`` and
``partially_unload``: the host's ``clone`` builds clones of the same class, so a LoRA applied downstream keeps it.
An unload (or a partial one under memory pressure) puts the CPU tensors back and frees the GPU ones, and so does
another clone of the same model (the float one) being loaded in its place: the host stops counting this one then,
and its next load would copy the layers again anyway.
"""
from __future__ import annotations

import logging

import torch

from ..octet import stream_ahead
from ..octet.modules import QuantLayer, same_storage
from ..kernels import vram
from . import host_compat

log = logging.getLogger("octet")


def install(patcher, layers) -> None:
    """Make the dynamic-VRAM ``patcher`` load ``layers`` (its object patches) as above."""
    if aimdo_resident not in vram.RECLAIMABLE:   # the speed goal's copies and graph pools may take that memory too
        vram.RECLAIMABLE.append(aimdo_resident)
    for layer in layers:
        if isinstance(layer, QuantLayer):
            layer.load_whole()      # aimdo's staged weights are for comfy.ops only (octet/modules.py)
    host_compat.mix_in(patcher, KeepsLoadedLayers)


class KeepsLoadedLayers(host_compat.RecordsInferenceReserve):
    """Mixed in before the host's dynamic patcher class (see the module docstring)."""

    def load(self, device_to=None, *args, **kwargs):
        # 0.29: load(device_to, lowvram_model_memory, force_patch_weights, full_load, dirty); partially_load passes
        # dirty=True when the patches changed since the last load (another clone, a LoRA added or removed).
        dirty = kwargs.get("dirty", args[3] if len(args) > 3 else False)
        layers = _octet_layers(self)
        stream_ahead.drop()         # streamed layers' copies made ahead: the layers may load whole or stream anew
        _return_foreign(self, layers)
        if dirty or device_to is None:
            _restore_layers(layers)             # loaded with other patches: from the originals again
        if device_to is not None:
            _LOADING.append(self)
            try:
                _fit_to_memory(self, device_to, layers)
            finally:
                _LOADING.remove(self)
        # What this model loaded before and is still on the device with the same patches (the Octet layers', and
        # the host modules' it always loads whole, such as norms) is hidden from the host's load: it would put
        # each CPU original back and cast or copy it again, wrap it in a new Parameter and make a backup entry
        # (the host builds a new namedtuple class for each: ~0.1 ms per tensor). The objects stay as they are,
        # so plans, a merged LoRA and a captured CUDA graph stay valid. (ON_LOAD callbacks of other packs, run
        # inside the host's load, see None for these tensors.)
        hidden = {} if dirty or device_to is None else _hide_loaded(self, device_to, layers)
        loaded = False
        try:
            super().load(device_to, *args, **kwargs)
            loaded = True
            merge_patches(self, device_to, skip=hidden)     # the hidden ones had their patches merged when loaded
        finally:
            kept = _unhide(self, hidden)
            if loaded:
                self.model.model_loaded_weight_memory += kept      # the host counts what it loads, and these
            _hold_originals(self, layers)

    def unpatch_model(self, device_to=None, unpatch_weights=True):
        # The dynamic patcher takes the object patches out first and puts the backups back after, by path: the
        # Octet layers' originals would land in the float modules. They go back into the layers first.
        if unpatch_weights:
            _restore_layers(_octet_layers(self))
        return super().unpatch_model(device_to, unpatch_weights)

    def detach(self, unpatch_all=True):
        if not unpatch_all:
            incoming = host_compat.clone_loading_in_place_of(self)
            if incoming is not None:
                # Another clone of the model is loaded in this one's place (the float MODEL, a LoRA'd one): the
                # host stops counting this one, and nothing runs these layers until it is loaded again, whose
                # load then copies them from their originals (other patches were loaded in between). Free them
                # now, as an unload does; not those the incoming clone has too (a clone with other model options).
                used = {id(m) for m in incoming.object_patches.values()}
                _restore_layers({key: entry for key, entry in _octet_layers(self).items() if id(entry[0]) not in used})
        return super().detach(unpatch_all)

    def partially_unload(self, device_to, memory_to_free=0, *args, **kwargs):
        freed = super().partially_unload(device_to, memory_to_free, *args, **kwargs)
        if self.model.model_loaded_weight_memory == 0:      # the host put its whole-loaded tensors back: ours too
            _restore_layers(_octet_layers(self))
        return freed


def _layer_budget(device_to):
    """Bytes the INT8 layers not loaded yet may take on ``device_to``, or None where there is no limit to keep (not
    a GPU): what is free (with what comfy-aimdo holds for dynamic models' staged weights, which it gives back when
    an allocation needs it: the host counts on that, its free_memory does not unload dynamic models for each other)
    less the reserve ComfyUI keeps for the prompt (kernels/vram.py)."""
    device = torch.device(device_to)
    if device.type != "cuda":
        return None
    return vram.free(device) - vram.reserve(device)


# The dynamic patcher deciding what of its layers fits (its load): not in the host's current_loaded_models until
# loaded, its staged weights (the float clone's, which the INT8 layers replace) still count as reclaimable.
_LOADING: list = []


def aimdo_resident(device) -> int:
    """Bytes comfy-aimdo holds on ``device`` for the staged weights of dynamic models (those loaded and the one
    loading), which it gives back when an allocation needs them."""
    import comfy.model_management as mm
    device = torch.device(device)
    vbars = {}
    for candidate in _LOADING + [m.model for m in mm.current_loaded_models]:
        get = getattr(candidate, "_vbar_get", None)
        if get is None or not _same_device(torch.device(candidate.load_device), device):
            continue
        vbar = get()
        if vbar is not None:
            vbars[id(vbar)] = vbar
    reclaimable = 0
    for vbar in vbars.values():
        try:
            reclaimable += int(vbar.loaded_size())
        except Exception:       # an aimdo without it: count nothing
            pass
    return reclaimable


_STREAM_MIN_BYTES = 64 * 1024     # below this the host loads a module whole anyway (its 16 KB rule, with margin)
_said: set = set()


def _fit_to_memory(patcher, device_to, layers: dict) -> None:
    """Octet's layers load whole (``install``), so an INT8 model that does not fit would run out of memory where the
    host streams the bf16 model (SDXL with 2.5 GiB free, H200 2026-12-04). The layers not loaded yet that do not
    fit the budget, largest first, stream instead: the host stages them and the layer copies its int8 weight to
    the GPU at each call (the graph step then runs eager). At each load, so that a later one with more free
    memory loads them whole again. Not a layer with patches (the host's per-call LoRA is comfy.ops's)."""
    by_layer = {}
    for key, (layer, name) in layers.items():
        by_layer.setdefault(layer, []).append(key)
    pending = {}
    for layer, keys in by_layer.items():
        if "weight" in layer.__dict__.get(ORIGINALS, {}):
            continue            # loaded whole by an earlier load and kept: nothing to decide
        tensors = [t for t in (*layer._parameters.values(), *layer._buffers.values()) if t is not None]
        pending[layer] = (sum(t.numel() * t.element_size() for t in tensors),
                          any(key in patcher.patches for key in keys))
    budget = _layer_budget(device_to)
    total = need = sum(size for size, _ in pending.values())
    stream = set()
    if budget is not None and need > budget:
        for layer, (size, patched) in sorted(pending.items(), key=lambda item: -item[1][0]):
            if need <= budget:
                break
            if not patched and size >= _STREAM_MIN_BYTES:
                stream.add(layer)
                need -= size
    for layer in pending:
        if layer in stream:
            layer.stream_per_call()
        elif layer.__dict__.get("_comfy_cast", False) is not None:   # streamed at an earlier load: whole again
            _unstage(layer)
            layer.load_whole()
    if stream:
        size = sum(pending[m][0] for m in stream)
        message = (f"Octet: the INT8 layers not on the GPU yet need {total / 2**30:.2f} "
                   f"GiB, {max(budget, 0) / 2**30:.2f} GiB is free beside ComfyUI's inference reserve: {len(stream)} "
                   f"layer(s) ({size / 2**30:.2f} GiB) stay in RAM and are copied to the GPU at each call (slower; "
                   f"no CUDA graphs). Free VRAM (unload other models), or quantize with goal memory, to load them whole.")
        # A warning the first time in a process; a later load that streams another number of layers (another
        # image size, other models loaded) says so at INFO.
        if len(stream) not in _said:
            log.log(logging.INFO if _said else logging.WARNING, message)
            _said.add(len(stream))


def _unstage(layer) -> None:
    """Undo the host's staging of a layer (what its load does before loading a module whole)."""
    v = layer.__dict__.get("_v")
    if v is not None:
        import comfy_aimdo.model_vbar
        comfy_aimdo.model_vbar.vbar_unpin(v)
        del layer.__dict__["_v"]


# A layer's CPU originals of what the host loaded whole, by tensor name: kept on the layer, not in the host's
# backups, which all clones of a model share and restore by path into whatever module is there (the float one).
ORIGINALS = "_octet_host_originals"


def _octet_layers(patcher) -> dict:
    """The Octet layers of ``patcher`` that are in its model now: host key -> (layer, tensor name)."""
    found = {}
    for path, layer in patcher.object_patches.items():
        if not isinstance(layer, QuantLayer):
            continue
        parent, name = _owner(patcher.model, path)
        if parent is not None and getattr(parent, name, None) is layer:
            for tensor_name in (*layer._parameters, *layer._buffers):
                found[f"{path}.{tensor_name}"] = (layer, tensor_name)
    return found


def _return_foreign(patcher, layers: dict) -> None:
    """Backups at the Octet layers' paths are another clone's: of the module our object patch replaced (a float
    one the host loaded whole). The host would put them back by path, into our layers; they go back into that
    module instead, as the host would have done had it unloaded that clone before swapping the modules."""
    for key in layers:
        path, _, name = key.rpartition(".")
        replaced = patcher.object_patches_backup.get(path)
        for backups, slots in ((patcher.backup, "_parameters"), (patcher.backup_buffers, "_buffers")):
            entry = backups.pop(key, None)
            if entry is None or not isinstance(replaced, torch.nn.Module):
                continue
            tensor = entry.weight if slots == "_parameters" else entry
            if name in getattr(replaced, slots):
                getattr(replaced, slots)[name] = tensor


def _hold_originals(patcher, layers: dict) -> None:
    """Move the host's backups of the Octet layers' tensors onto the layers (the first one seen is the CPU
    original: a kept tensor's later backup is the loaded tensor itself)."""
    for key, (layer, name) in layers.items():
        for backups in (patcher.backup, patcher.backup_buffers):
            if key in backups:
                entry = backups.pop(key)
                layer.__dict__.setdefault(ORIGINALS, {}).setdefault(name, entry)


def _restore_layers(layers: dict) -> None:
    """Put the CPU originals back into the layers (their loaded tensors are freed with the plans holding them)."""
    stream_ahead.drop()         # a streamed layer's copy made ahead of its call, if any
    for layer, name in layers.values():
        entry = layer.__dict__.get(ORIGINALS, {}).pop(name, None)
        if entry is None:
            continue
        if name in layer._parameters:
            setattr(layer, name, entry.weight)      # QuantLayer.__setattr__ drops the plans made on the old one
        else:
            layer._buffers[name] = entry


def _owner(model, key: str):
    """(module, attribute name) of ``key`` ("diffusion_model.x.y.weight"); module None if there is none."""
    path, _, name = key.rpartition(".")
    try:
        return model.get_submodule(path), name
    except AttributeError:
        return None, name


def _on_device(t: torch.Tensor, device) -> bool:
    return _same_device(t.device, torch.device(device))


def _same_device(a: torch.device, b: torch.device) -> bool:
    """The same device; a CUDA device without an index is the current one (``host_compat.device_key``)."""
    # Per tensor at every load: most pairs are decided here, without asking CUDA for its current device.
    if a == b:
        return True
    if a.type != b.type:
        return False
    return host_compat.device_key(a) == host_compat.device_key(b)


def _hide_loaded(patcher, device_to, layers: dict) -> dict:
    """Set to None, for the host's load, the tensors this model loaded before that are still on ``device_to``:
    the Octet layers' (their originals are on the layers) and the host modules' whose backup (the CPU original)
    is another tensor, taken out of the backups so that the load does not put it back. Not a host weight with
    patches: the host merges those at each load from the backup. key -> (slots, name, tensor, backup or None)."""
    hidden = {}
    for key, (layer, name) in layers.items():
        slots = layer._parameters if name in layer._parameters else layer._buffers
        tensor = slots.get(name)
        if tensor is not None and name in layer.__dict__.get(ORIGINALS, {}) and _on_device(tensor, device_to):
            hidden[key] = (slots, name, tensor, None)
    for kind, backups in (("param", patcher.backup), ("buffer", patcher.backup_buffers)):
        for key in list(backups):
            module, name = _owner(patcher.model, key)
            if module is None or isinstance(module, QuantLayer) or (kind == "param" and key in patcher.patches):
                continue
            slots = module._parameters if kind == "param" else module._buffers
            tensor = slots.get(name)
            if tensor is None or not _on_device(tensor, device_to):
                continue
            backup = backups[key]
            original = backup.weight if kind == "param" else backup
            if getattr(backup, "inplace_update", False) or same_storage(original, tensor):
                continue   # nothing was copied (or the host copies in place): nothing to keep
            hidden[key] = (slots, name, tensor, (backups, backups.pop(key)))
    for slots, name, _, _ in hidden.values():
        slots[name] = None      # named_parameters / named_buffers skip it; the host's get_key_weight finds None
    return hidden


def _unhide(patcher, hidden: dict) -> int:
    """Put the hidden tensors and the host's backups of them back; the bytes back in place."""
    kept = 0
    for key, (slots, name, tensor, backup) in hidden.items():
        if backup is not None:
            backups, entry = backup
            backups[key] = entry
        if slots.get(name) is None:
            slots[name] = tensor
            kept += tensor.numel() * tensor.element_size()
    return kept


def merge_patches(patcher, device_to, skip=()) -> None:
    """Merge the weight patches (LoRA) of ``patcher``'s Octet layers, which the host just loaded whole, as a full
    load merges them: into the float weight, re-quantized to int8. The CPU original stays on the layer for the
    unload. ``skip``: keys whose loaded tensors were hidden from this load (a load that merged them already)."""
    for key in list(patcher.patches):
        if key in skip or key not in patcher.backup:
            continue
        module, name = _owner(patcher.model, key)
        if isinstance(module, QuantLayer) and name in ("weight", "bias"):
            patcher.patch_weight_to_device(key, device_to=device_to)
