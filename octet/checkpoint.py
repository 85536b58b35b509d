"""Quantized checkpoints as safetensors, in ComfyUI's ``comfy_quant`` convention.

Per quantized layer ``L``: ``L.weight`` (int8), ``L.weight_scale`` (fp32 [N, 1]),
``L.comfy_quant`` (uint8 bytes of a JSON object with ``format``), and where used
``L.input_scale`` (fp32 [groups]) and ``L.pre_quant_scale`` (fp32 [K]). Linear layers whose
math is exactly the host's ``int8_tensorwise`` (per-row weight scale, per-token dynamic
activations, no smoothing) carry that format, so a ComfyUI with comfy-kitchen decodes them with
its own code; the others carry ``octet_int8`` with the extra fields Octet needs.

The safetensors header holds ``_quantization_metadata`` (the host's summary) and ``octet`` (our
own: format version, architecture, mode, policy, calibration summary, source model hash). Keys
are the diffusion model's own state-dict keys, as in ComfyUI's diffusion_models files.

Writes go to a temporary file in the target folder and are renamed into place, so a failure
never leaves a half-written file or clobbers an existing one. Reads validate everything before
anything is built, and every problem is an OctetError that says what to do.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn

from ..kernels.torch_ref import pair
from . import fusion
from .api import OctetError
from .modules import QuantConv2d, QuantLayer, QuantLinear
from .safefile import save_atomic

FORMAT_VERSION = 1
HOST_FORMAT = "int8_tensorwise"
OCTET_FORMAT = "octet_int8"
KNOWN_FORMATS = (HOST_FORMAT, OCTET_FORMAT)
QUANT_SUFFIXES = ("weight", "weight_scale", "input_scale", "pre_quant_scale", "bias", "comfy_quant")


@dataclass
class LoadedCheckpoint:
    tensors: dict[str, torch.Tensor]
    layers: dict[str, dict]              # layer name -> comfy_quant JSON
    octet: dict = field(default_factory=dict)  # Octet header (empty for foreign comfy_quant files)


def layer_spec(module: QuantLayer) -> dict:
    kind = "linear" if isinstance(module, QuantLinear) else "conv"
    host_compatible = (kind == "linear" and module.act == "dynamic" and module.pre_quant_scale is None)
    spec = {"format": HOST_FORMAT if host_compatible else OCTET_FORMAT,
            "octet": {"kind": kind, "act": module.act}}
    if kind == "conv":
        spec["octet"].update(stride=list(pair(module.stride)), padding=_padding(module.padding),
                             dilation=list(pair(module.dilation)), groups=module.groups)
    if module.input_scale is not None:
        spec["octet"]["timestep_groups"] = module.group_selector is not None
    return spec


def _padding(p):
    return p if isinstance(p, str) else list(pair(p))


def _json_tensor(obj: dict) -> torch.Tensor:
    return torch.frombuffer(bytearray(json.dumps(obj, sort_keys=True).encode()), dtype=torch.uint8).clone()


def _tensor_json(t: torch.Tensor, key: str) -> dict:
    try:
        return json.loads(bytes(t.to(torch.uint8).tolist()).decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise OctetError(f"'{key}' is not valid comfy_quant JSON ({e}); the file is damaged. Re-save it.") from e


def collect(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """The state dict to save and the per-layer specs, from a model holding Quant* modules."""
    tensors = {k: v.detach() for k, v in model.state_dict().items()}
    layers = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantLayer):
            layers[name] = spec = layer_spec(m)
            tensors[f"{name}.comfy_quant"] = _json_tensor(spec)
    if not layers:
        raise OctetError("This model has no quantized layer to save: run Quantize Model (or load an Octet "
                         "checkpoint) first.")
    return tensors, layers


def save(path: str, model: nn.Module, octet_meta: dict, float_dtype: Optional[torch.dtype] = None) -> dict:
    """Save a quantized model atomically; returns the header metadata written.

    ``float_dtype``: dtype for the tensors of layers that stay float (norms, embeddings, kept layers), e.g. the
    source file's fp16 when the model ran in fp32 (issue 15: float layers written as fp32 made the "INT8"
    file 1.18x the fp16 source). The quantized layers' own tensors (int8 weights, fp32 scales) are untouched.
    """
    tensors, layers = collect(model)
    tensors = {k: v.to("cpu").contiguous() for k, v in tensors.items()}
    if float_dtype is not None:
        tensors = {k: (v.to(float_dtype) if v.is_floating_point() and k.rsplit(".", 1)[0] not in layers else v)
                   for k, v in tensors.items()}
    meta = {
        "_quantization_metadata": json.dumps({"format_version": "1.0",
                                              "layers": {n: {"format": s["format"]} for n, s in layers.items()}}),
        "octet": json.dumps({"format_version": FORMAT_VERSION, **octet_meta}, sort_keys=True),
    }
    save_atomic(tensors, path, meta)
    return meta


def read(path: str) -> LoadedCheckpoint:
    """Read and validate a quantized checkpoint (Octet's or any int8_tensorwise comfy_quant file)."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise OctetError(f"No file at '{path}'. Put the checkpoint in ComfyUI's models/diffusion_models folder "
                         f"or pass its full path.")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several error types for damaged files
        raise OctetError(f"'{os.path.basename(path)}' is not a readable safetensors file ({type(e).__name__}: "
                         f"{e}). It is corrupted or truncated: download or save it again.") from e

    octet = {}
    if "octet" in header:
        try:
            octet = json.loads(header["octet"])
        except json.JSONDecodeError as e:
            raise OctetError(f"'{os.path.basename(path)}' has a damaged Octet header ({e}). Save it again.") from e
        version = octet.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise OctetError(f"'{os.path.basename(path)}' uses Octet format version {version!r}; this Octet reads "
                             f"up to {FORMAT_VERSION}. Update the Octet node pack.")

    layers = {k[: -len(".comfy_quant")]: _tensor_json(v, k) for k, v in tensors.items()
              if k.endswith(".comfy_quant")}
    if not layers:
        raise OctetError(f"'{os.path.basename(path)}' holds no quantized layers (no '.comfy_quant' entries): it is "
                         f"not an Octet/comfy_quant INT8 checkpoint. Load a float model with ComfyUI's 'Load "
                         f"Diffusion Model' node, then use Octet's Quantize Model.")
    for name, spec in layers.items():
        _validate_layer(name, spec, tensors, os.path.basename(path))
    return LoadedCheckpoint(tensors, layers, octet)


def _validate_layer(name: str, spec: dict, tensors: dict, fname: str) -> None:
    fmt = spec.get("format")
    if fmt not in KNOWN_FORMATS:
        raise OctetError(f"Layer '{name}' in '{fname}' uses format {fmt!r}; Octet reads {list(KNOWN_FORMATS)}. "
                         f"Load this file with the node pack that made it.")
    w, s = tensors.get(f"{name}.weight"), tensors.get(f"{name}.weight_scale")
    if w is None or s is None:
        raise OctetError(f"Layer '{name}' in '{fname}' lacks its weight or weight_scale: the file is incomplete.")
    if w.dtype != torch.int8:
        raise OctetError(f"Layer '{name}' in '{fname}': weight is {w.dtype}, expected int8.")
    if s.numel() not in (1, w.shape[0]) or not torch.isfinite(s).all() or (s <= 0).any():
        raise OctetError(f"Layer '{name}' in '{fname}': weight_scale has shape {tuple(s.shape)} or non-positive/"
                         f"non-finite values; expected {w.shape[0]} positive scales. The file is damaged.")


def build_layer(name: str, spec: dict, tensors: dict, like: Optional[nn.Module] = None,
                selector=None, backend: str = "auto") -> QuantLayer:
    """A Quant* module from checkpoint tensors; ``like`` (the float/meta layer) supplies conv geometry."""
    extra = spec.get("octet", {})
    w = tensors[f"{name}.weight"]
    scale = tensors[f"{name}.weight_scale"].float()
    if scale.numel() == 1:  # a tensorwise scale from another tool: broadcast to per-channel
        scale = scale.reshape(1).expand(w.shape[0]).clone()
    bias = tensors.get(f"{name}.bias")
    kind = extra.get("kind", "conv" if w.dim() == 4 else "linear")
    act = extra.get("act", "dynamic")
    if kind == "linear":
        layer = QuantLinear(w, scale, bias, act, backend)
    else:
        geom = {k: extra.get(k, getattr(like, k, None)) for k in ("stride", "padding", "dilation", "groups")}
        if any(v is None for v in geom.values()):
            raise OctetError(f"Conv layer '{name}' has no stride/padding information in the checkpoint.")
        geom = {k: (tuple(v) if isinstance(v, list) else v) for k, v in geom.items()}
        layer = QuantConv2d(w, scale, bias, act, backend, **geom)
    if f"{name}.pre_quant_scale" in tensors:
        layer.set_smoothing(tensors[f"{name}.pre_quant_scale"])
    if f"{name}.input_scale" in tensors:
        layer.set_static_scales(tensors[f"{name}.input_scale"], selector if extra.get("timestep_groups") else None)
    elif act == "static":
        raise OctetError(f"Layer '{name}' is static W8A8 but the file has no input_scale: the file is incomplete.")
    return layer


def install(model: nn.Module, ckpt: LoadedCheckpoint, selector=None, backend: str = "auto") -> None:
    """Replace the model's float (or meta) layers by the checkpoint's quantized ones and load the rest.

    Raises OctetError naming the mismatching keys when the checkpoint is for another architecture.
    """
    modules = dict(model.named_modules())
    missing_layers = [n for n in ckpt.layers if n not in modules]
    if missing_layers:
        raise OctetError(f"The checkpoint does not fit this architecture: it quantizes layers this model does "
                         f"not have (e.g. {missing_layers[:3]}). It was made for another model type.")
    for name, spec in ckpt.layers.items():
        layer = build_layer(name, spec, ckpt.tensors, modules[name], selector, backend)
        old_w = getattr(modules[name], "weight", None)
        if old_w is not None and tuple(old_w.shape) != tuple(layer.weight.shape):
            raise OctetError(f"The checkpoint does not fit this architecture: layer '{name}' has weight shape "
                             f"{tuple(layer.weight.shape)} in the file but {tuple(old_w.shape)} in the model.")
        model.set_submodule(name, layer)
    quant_keys = {f"{n}.{s}" for n in ckpt.layers for s in QUANT_SUFFIXES}
    rest = {k: v for k, v in ckpt.tensors.items() if k not in quant_keys}
    expected = {k for k in model.state_dict() if k not in quant_keys}
    missing, unexpected = sorted(expected - set(rest)), sorted(set(rest) - expected)
    if missing or unexpected:
        raise OctetError(f"The checkpoint does not fit this architecture: {len(missing)} tensors missing "
                         f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}). "
                         f"It was made for another model type or configuration.")
    own = model.state_dict()
    for k, v in rest.items():
        if tuple(own[k].shape) != tuple(v.shape):
            raise OctetError(f"The checkpoint does not fit this architecture: '{k}' has shape {tuple(v.shape)} in "
                             f"the file but {tuple(own[k].shape)} in the model.")
    model.load_state_dict(rest, strict=False, assign=True)
    fusion.install_chains(model)
