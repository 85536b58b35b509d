"""Quantized MODEL files: Save Quantized and Load Quantized on the host side.

Saving reads the INT8 MODEL as it runs (its object-patched layers in place) and hands modules and
state to ``octet.checkpoint``; loading validates the file (``octet.filecheck``), rebuilds the
architecture through the running host's detection (``host_compat``) on the meta device, installs
the quantized layers and wraps the result in a ModelPatcher carrying Octet's description.
"""
from __future__ import annotations

import datetime
import os

import torch

from ..octet import checkpoint, filecheck, fileformat, tables
from ..octet.api import OctetError
from ..octet.report import write_report
from ..octet.timestep import GroupSelector
from . import bridge, host_compat
from .widgets import install_cfg_guard


def patched_view(patcher, unet_config: dict | None = None) -> tuple[dict, dict]:
    """(modules by name, state dict) of the diffusion model as the INT8 MODEL runs it: its object-patched
    quantized layers in place of the float ones, without swapping anything into the shared torch model.
    Every module is listed (the saver needs the Linear layers too: a stock-loader refusal rides on one,
    octet/fileformat.py). ``unet_config``: map state keys to what files carry on every host."""
    dm, layers = bridge.diffusion_model(patcher), bridge.quantized_layers(patcher)
    modules = {name: layers.get(name, module) for name, module in dm.named_modules()}
    # A model loaded with the memory goal holds SD3's position table in int8; files keep it in float.
    state = {k: v for k, v in tables.dequantized_state(dm, dm.state_dict()).items()
             if k.rsplit(".", 1)[0] not in layers}
    for name, layer in layers.items():
        state.update({f"{name}.{k}": v for k, v in layer.state_dict().items()})
    return modules, (state if unet_config is None else host_compat.keys_for_file(unet_config, state))


def save_model(patcher, path: str, kind: str = "octet") -> dict:
    if not bridge.quantized_layers(patcher):
        raise OctetError("This MODEL has no Octet-quantized layers: connect the output of Quantize Model "
                         "(or Load Quantized) to Save Quantized.")
    if patcher.patches:
        raise OctetError("This MODEL carries weight patches (e.g. a LoRA). Save the quantized model before "
                         "applying LoRAs, or merge them before Quantize Model.")
    info = bridge.octet_info(patcher)
    mc = patcher.model.model_config
    meta = {
        "architecture": bridge.architecture(patcher),
        "unet_config": {k: v for k, v in mc.unet_config.items() if k not in ("dtype", "operations", "device")},
        "model_type": patcher.model.model_type.name,
        "dtype": str(patcher.model.get_dtype()).replace("torch.", ""),
        **{k: info.get(k) for k in bridge.CARRIED_KEYS},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "octet_version": _version(),
    }
    written = checkpoint.save_parts(path, *patched_view(patcher, mc.unet_config), meta, kind=kind,
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
    for _, t in bridge.diffusion_model(patcher).named_parameters():
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
    if (ckpt.octet.get("config") or {}).get("goal") == "memory":
        tables.install(model.diffusion_model)   # SD3's position table in int8, as Quantize Model made it
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    if leftover:
        raise OctetError(f"The checkpoint does not fit this architecture: {len(leftover)} tensors were not in the "
                         f"file (e.g. {leftover[:3]}).")
    model.to(offload_device)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)
    options = patcher.model_options[bridge.OPTIONS_KEY] = {k: ckpt.octet.get(k)
                                                           for k in ("architecture",) + bridge.CARRIED_KEYS}
    options["file"] = os.path.basename(path)
    options["file_kind"] = fileformat.describe(ckpt.octet, ckpt.layers)
    install_cfg_guard(patcher)
    if selector is not None:
        bridge.install_timestep_groups(patcher, selector)
    return patcher


def _is_quant_param(key: str, layers: dict) -> bool:
    return key.rsplit(".", 1)[0] in layers and key.rsplit(".", 1)[1] != "bias"
