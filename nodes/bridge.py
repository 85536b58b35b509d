"""ModelPatcher integration: the only place that knows how ComfyUI holds a model.

Quantizing never touches the source MODEL: we clone the ModelPatcher and install the quantized
layers as *object patches*, which ComfyUI swaps in when the clone is loaded and swaps back when
it is unloaded. The source keeps its float layers and samples exactly as before; load, unload,
lowvram offload and further clones keep working through the host's own machinery.
"""
from __future__ import annotations

import datetime
import logging
import os
import uuid

import torch

from ..octet import checkpoint, filecheck, fileformat, quantize_
from ..octet.api import OctetError
from ..octet.fingerprint import module_fingerprint
from ..octet.modules import QuantLayer
from ..octet.policy import write_report
from ..octet.timestep import GroupSelector
from . import host_compat
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
    clone = patcher.clone()
    merged = [PREFIX + n + ".weight" for n in result.replacements if n in overrides]
    if merged:
        # Those patches now live inside the int8 weights; applying them again at load would double them.
        clone.patches = {k: v for k, v in clone.patches.items() if k not in merged}
        clone.patches_uuid = uuid.uuid4()
    for name, layer in result.replacements.items():
        clone.add_object_patch(PREFIX + name, layer)
    for name, forward in result.forwards.items():
        # The container stays the source model's; only its forward is patched (and restored).
        clone.add_object_patch(PREFIX + name + ".forward", forward)
    # ModelPatcher budgets VRAM with model_size(); the clone inherited the float size.
    clone.size = patcher.model_size() - result.bytes_before + result.bytes_after
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


class _Overlay(torch.nn.Module):
    """A read-only view of the diffusion model with the object-patched layers in place, for saving."""

    def __init__(self, dm: torch.nn.Module, layers: dict[str, QuantLayer], unet_config: dict | None = None):
        super().__init__()
        self._dm, self._layers, self._unet_config = [dm], layers, unet_config

    def named_modules(self, *args, **kwargs):
        # Every module, the patched layers in place: the saver needs the Linear layers too
        # (a stock-loader refusal rides on one; octet/fileformat.py).
        for name, module in self._dm[0].named_modules():
            yield name, self._layers.get(name, module)

    def state_dict(self, *args, **kwargs):
        sd = {k: v for k, v in self._dm[0].state_dict().items() if k.rsplit(".", 1)[0] not in self._layers}
        for name, layer in self._layers.items():
            sd.update({f"{name}.{k}": v for k, v in layer.state_dict().items()})
        return sd if self._unet_config is None else host_compat.keys_for_file(self._unet_config, sd)


def save_model(patcher, path: str, kind: str = "octet") -> dict:
    layers = quantized_layers(patcher)
    if not layers:
        raise OctetError("This MODEL has no Octet-quantized layers: connect the output of Quantize Model "
                         "(or Load Quantized) to Save Quantized.")
    if patcher.patches:
        raise OctetError("This MODEL carries weight patches (e.g. a LoRA). Save the quantized model before "
                         "applying LoRAs, or merge them before Quantize Model.")
    info = octet_info(patcher)
    mc = patcher.model.model_config
    meta = {
        "architecture": architecture(patcher),
        "unet_config": {k: v for k, v in mc.unet_config.items() if k not in ("dtype", "operations", "device")},
        "model_type": patcher.model.model_type.name,
        "dtype": str(patcher.model.get_dtype()).replace("torch.", ""),
        **{k: info.get(k) for k in CARRIED_KEYS},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "octet_version": _version(),
    }
    written = checkpoint.save(path, _Overlay(diffusion_model(patcher), layers, mc.unet_config), meta, kind=kind,
                              float_dtype=_source_dtype(patcher))
    report = info.get("report")
    if report:  # the per-layer table (and sensitivity scores) as <name>.report.txt/.json beside the file
        write_report(path, report["layers"], report["policy"], meta)
    return written


def _source_dtype(patcher) -> torch.dtype:
    """The float dtype float layers are saved in: the source file's where the loader recorded it (a
    model loaded from fp16 and run in fp32 saves them as fp16), else the model's unquantized weights'."""
    source = patcher.model_options.get("octet_reference", {}).get("source_dtype")
    if source:
        return getattr(torch, source)
    counts: dict = {}
    for _, t in diffusion_model(patcher).named_parameters():
        if t.is_floating_point():
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
    return max(counts, key=counts.get) if counts else patcher.model.get_dtype()


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("comfyui-octet")
    except Exception:
        return "0.1.0"


def _model_config(ckpt: checkpoint.LoadedCheckpoint, path: str):
    """The architecture, rebuilt through the running host's detection (see host_compat)."""
    return host_compat.model_config_from_checkpoint(ckpt.tensors, ckpt.octet, os.path.basename(path))


def load_model(path: str, backend: str = "auto"):
    """Rebuild a quantized MODEL from a checkpoint, never allocating the float weights of quantized layers."""
    with filecheck.about_file(path):  # every refusal names the file
        return _load_model(path, backend)


def _load_model(path: str, backend: str):
    import comfy.model_management as mm
    import comfy.model_patcher

    host_compat.sync_core()
    ckpt = checkpoint.read(path)
    config = _model_config(ckpt, path)
    ckpt.tensors, ckpt.layers = host_compat.keys_for_host(config, ckpt.tensors, ckpt.layers, os.path.basename(path))
    load_device, offload_device = mm.get_torch_device(), mm.unet_offload_device()
    params = sum(t.numel() for t in ckpt.tensors.values())
    dtype = mm.unet_dtype(model_params=params, supported_dtypes=list(config.supported_inference_dtypes))
    config.set_inference_dtype(dtype, mm.unet_manual_cast(dtype, load_device, config.supported_inference_dtypes))
    # Build on the meta device: quantized layers replace their float twins before any memory is used.
    model = filecheck.guarded_build(ckpt.file, lambda: config.get_model({}, "", device=torch.device("meta")))
    ckpt.tensors = {k: (v.to(dtype) if v.is_floating_point() and not _is_quant_param(k, ckpt.layers) else v)
                    for k, v in ckpt.tensors.items()}
    groups = ckpt.octet.get("timestep_groups")
    selector = GroupSelector.from_dict(groups) if groups else None
    checkpoint.install(model.diffusion_model, ckpt, selector=selector, backend=backend)
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    if leftover:
        raise OctetError(f"The checkpoint does not fit this architecture: {len(leftover)} tensors were not in the "
                         f"file (e.g. {leftover[:3]}).")
    model.to(offload_device)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)
    patcher.model_options[OPTIONS_KEY] = {k: ckpt.octet.get(k) for k in ("architecture",) + CARRIED_KEYS}
    patcher.model_options[OPTIONS_KEY]["file"] = os.path.basename(path)
    patcher.model_options[OPTIONS_KEY]["file_kind"] = fileformat.describe(ckpt.octet, ckpt.layers)
    install_cfg_guard(patcher)
    if selector is not None:
        install_timestep_groups(patcher, selector)
    return patcher


def _is_quant_param(key: str, layers: dict) -> bool:
    return key.rsplit(".", 1)[0] in layers and key.rsplit(".", 1)[1] != "bias"


# -- timestep groups ------------------------------------------------------------------------------
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
    the header keeps the bands), Calibrate on its float clone (another ``key``; ``before_call`` checks
    for Cancel between two model calls).

    ComfyUI's APPLY_MODEL wrappers receive the sigma of the call (``t``) before the model sees it,
    with any sampler, including the stock KSampler; they are stacked by key, so other packs'
    wrappers and set_model_unet_function_wrapper stay free. The wrapper is stored on this patcher
    and copied into its clones; the header records ``selector.to_dict()`` so Load Quantized
    rebuilds the same bands.
    """
    import comfy.patcher_extension

    def select_group(executor, x, t, *args, **kwargs):
        if before_call is not None:
            before_call()
        selector.select(t)
        return executor(x, t, *args, **kwargs)

    patcher.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, key)
    patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, key, select_group)
    if record:
        patcher.model_options.setdefault(OPTIONS_KEY, {})["timestep_groups"] = selector.to_dict()
