"""ModelPatcher integration: how ComfyUI holds a model (clones, object patches, wrappers).

Files (Save/Load Quantized) are nodes/model_files.py; sampling drivers for measurements are
nodes/sampling.py; what differs between host versions is nodes/host_compat.py.

Quantizing never touches the source MODEL: we clone the ModelPatcher and install the quantized
layers as *object patches*, which ComfyUI swaps in when the clone is loaded and swaps back when
it is unloaded. The source keeps its float layers and samples exactly as before; load, unload,
lowvram offload and further clones keep working through the host's own machinery.
"""
from __future__ import annotations

import logging
import uuid

import torch

from ..octet import quantize_, stream_ahead
from ..octet.api import OctetError
from ..octet.fingerprint import module_fingerprint
from ..octet.modules import QuantLayer
from ..octet.timestep import GroupSelector
from . import dynamic_vram, host_compat
from .widgets import install_cfg_guard

log = logging.getLogger("octet")
PREFIX = "diffusion_model."
OPTIONS_KEY = "octet"  # model_options entry holding Octet's (JSON-able) description of the model
# What travels from that description into a checkpoint's header and back when it is loaded.
CARRIED_KEYS = ("mode", "config", "policy", "policy_spec", "calibration", "source_hash", "timestep_groups", "qat")
TIMESTEP_WRAPPER_KEY = "octet_timestep_groups"


def release_clones(patcher) -> None:
    """Unload every loaded clone that shares ``patcher``'s torch model, through the host.

    Clones share one torch model, and a loaded clone's object patches (e.g. our quantized layers)
    stay swapped into it until the host unloads that clone. Code that reads or hooks the model's
    modules (quantize, save, calibrate) calls this first so it sees ``patcher``'s own view; the
    host reloads the clones on their next use.
    """
    import comfy.model_management as mm
    # ``patcher`` itself is unloaded too: the host hands over between clones without unpatching
    # (detach(unpatch_all=False)) and clones share one object_patches_backup, so only a full
    # unload of whichever clone is loaded restores the model to the float modules.
    for i in range(len(mm.current_loaded_models) - 1, -1, -1):
        loaded = mm.current_loaded_models[i]
        if loaded.model is not None and loaded.model.is_clone(patcher) and loaded.model_unload():
            mm.current_loaded_models.pop(i)


def diffusion_model(patcher) -> torch.nn.Module:
    model = getattr(patcher, "model", None)
    dm = getattr(model, "diffusion_model", None)
    if dm is None:
        raise OctetError(f"Expected a diffusion MODEL (from Load Checkpoint / Load Diffusion Model), got "
                         f"{type(patcher).__name__}. Connect the MODEL output, not CLIP or VAE.")
    return dm


def architecture(patcher) -> str:
    return type(patcher.model.model_config).__name__


def octet_info(patcher) -> dict:
    return patcher.model_options.get(OPTIONS_KEY, {})


def quantized_layers(patcher) -> dict[str, QuantLayer]:
    """Quantized layers of a MODEL, whether installed as object patches or built in."""
    release_clones(patcher)
    found = {k[len(PREFIX):]: v for k, v in patcher.object_patches.items()
             if k.startswith(PREFIX) and isinstance(v, QuantLayer)}
    for name, m in diffusion_model(patcher).named_modules():
        if isinstance(m, QuantLayer):
            found.setdefault(name, m)
    return found


def with_layers(patcher, layers: dict) -> object:
    """A clone of ``patcher`` with ``layers`` (diffusion-model names -> modules) as object patches."""
    clone = patcher.clone()
    for name, layer in layers.items():
        clone.add_object_patch(PREFIX + name, layer)
    if host_compat.dynamic_vram(clone):     # ComfyUI >= 0.29's default on NVIDIA
        dynamic_vram.install(clone, layers.values())
    else:
        host_compat.mix_in(clone, host_compat.RecordsInferenceReserve)
    import comfy.patcher_extension as pe
    clone.remove_callbacks_with_key(pe.CallbacksMP.ON_DETACH, STREAM_AHEAD_KEY)
    clone.add_callback_with_key(pe.CallbacksMP.ON_DETACH, STREAM_AHEAD_KEY, _drop_copies_ahead)
    return clone


STREAM_AHEAD_KEY = "octet_stream_ahead"


def _drop_copies_ahead(patcher, unpatch_all=True) -> None:
    """The host unloaded the model: a streamed layer's copy made ahead of its call (octet/stream_ahead.py) is given
    back now, not at the next streamed call of whatever model runs next (the legacy patcher's lowvram streams too)."""
    if unpatch_all:
        stream_ahead.drop()


def quantize_model(patcher, config, policy=None, calibration=None, progress=None):
    """Clone ``patcher`` and install quantized layers as object patches. Returns (clone, result)."""
    host_compat.sync_core()
    dm = diffusion_model(patcher)
    if quantized_layers(patcher):
        raise OctetError("This MODEL is already quantized by Octet. Connect the float MODEL to Quantize Model.")
    source_hash = module_fingerprint(dm)
    if calibration is not None:
        calibration.check_model(dm, architecture(patcher))
    overrides = _weights_with_patches(patcher, dm)
    with torch.no_grad():
        result = quantize_(dm, config, policy=policy, calibration=calibration, inplace=False, progress=progress,
                           weight_overrides=overrides)
    clone = with_layers(patcher, result.replacements)
    merged = [PREFIX + n + ".weight" for n in result.replacements if n in overrides]
    if merged:
        # Those patches now live inside the int8 weights; applying them again at load would double them.
        clone.patches = {k: v for k, v in clone.patches.items() if k not in merged}
        clone.patches_uuid = uuid.uuid4()
    for name, forward in result.forwards.items():
        # The container stays the source model's; only its forward is patched (and restored).
        clone.add_object_patch(PREFIX + name + ".forward", forward)
    for path, value in result.attributes.items():   # SD3's int8 position table (memory goal, octet/tables.py)
        clone.add_object_patch(PREFIX + path, value)
    # ModelPatcher budgets VRAM with model_size(); the clone inherited the float size.
    clone.size = (patcher.model_size() - result.bytes_before + result.bytes_after
                  - result.tables_before + result.tables_after)
    clone.model_options[OPTIONS_KEY] = {
        "architecture": architecture(patcher),
        "mode": config.mode,
        "config": config.to_dict(),
        "source_hash": source_hash,
        "summary": result.summary(),
        "policy": getattr(policy, "name", None),
        "policy_spec": _policy_dict(policy, compact=True),
        "calibration": calibration.summary() if calibration is not None else None,
        # Not written into the checkpoint header (too big): save_model writes it beside the file.
        "report": {"layers": result.to_dict()["layers"], "policy": _policy_dict(policy)},
        "timestep_groups": None,
    }
    install_cfg_guard(clone)
    selector = _static_selector(result)
    if selector is not None:
        install_timestep_groups(clone, selector)
    log.info("Octet: %s", result.summary())
    return clone, result


def _policy_dict(policy, compact=False):
    to_dict = getattr(policy, "to_dict", None)
    return to_dict(compact=compact) if to_dict is not None else None


def _weights_with_patches(patcher, dm) -> dict[str, torch.Tensor]:
    """Float weights with the patcher's weight patches (LoRA before Quantize Model) applied, by layer."""
    import comfy.lora
    out = {}
    for key, patches in patcher.patches.items():
        if not (key.startswith(PREFIX) and key.endswith(".weight")):
            continue
        name = key[len(PREFIX):-len(".weight")]
        weight = dm.get_submodule(name).weight
        out[name] = comfy.lora.calculate_weight(patches, weight.detach().float().clone(), key)
    return out


# -- wrappers around the diffusion-model calls -------------------------------------------------------
def set_apply_model_wrapper(patcher, key: str, wrapper) -> None:
    """Run ``wrapper(executor, x, t, *args, **kwargs)`` around every diffusion-model call of ``patcher``,
    replacing any wrapper it holds under ``key``.

    ComfyUI's APPLY_MODEL wrappers receive the sigma of the call (``t``) before the model sees it,
    with any sampler, including the stock KSampler; they are stacked by key, so other packs'
    wrappers and set_model_unet_function_wrapper stay free. The wrapper is stored on this patcher
    and copied into its clones. Octet's (timestep groups, INT8 Sampler's step timer, the CUDA graph
    step) all go through here.
    """
    import comfy.patcher_extension
    patcher.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, key)
    patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, key, wrapper)


def _static_selector(result):
    """The one GroupSelector the static layers of a quantization share (None if none uses groups)."""
    selectors = {id(q.group_selector): q.group_selector for q in result.replacements.values()
                 if getattr(q, "group_selector", None) is not None}
    if len(selectors) > 1:
        raise OctetError("Layers of one model use different timestep-group selectors; quantize with one CALIBRATION.")
    return next(iter(selectors.values()), None)


def install_timestep_groups(patcher, selector: GroupSelector, key: str = TIMESTEP_WRAPPER_KEY,
                            before_call=None, record: bool = True) -> None:
    """Make every diffusion-model call pick the static scales of the group holding its sigma.

    The one sigma-following wrapper: Quantize/Load Quantized install it on the INT8 MODEL (``record``:
    the header keeps the bands, ``selector.to_dict()``, so Load Quantized rebuilds the same ones),
    Calibrate on its float clone (another ``key``; ``before_call`` checks for Cancel between two
    model calls).
    """
    def select_group(executor, x, t, *args, **kwargs):
        if before_call is not None:
            before_call()
        selector.select(t)
        return executor(x, t, *args, **kwargs)

    set_apply_model_wrapper(patcher, key, select_group)
    if record:
        patcher.model_options.setdefault(OPTIONS_KEY, {})["timestep_groups"] = selector.to_dict()
