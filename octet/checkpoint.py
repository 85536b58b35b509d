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
import logging
import os
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn

from . import community, deferred, filecheck, float_fusions, fileformat, fusion, lean_blocks, shared_input
from .api import OctetError
from .layout import FILE_FORMATS, Int8Layout
from .modules import QuantConv2d, QuantLayer, QuantLinear
from .safefile import save_atomic

log = logging.getLogger("octet")

FORMAT_VERSION = fileformat.LATEST_VERSION  # 2: Octet-namespaced keys (octet/fileformat.py)
HOST_FORMAT = fileformat.HOST_FORMAT
OCTET_FORMAT = fileformat.OCTET_FORMAT
KNOWN_FORMATS = tuple(FILE_FORMATS)
QUANT_SUFFIXES = Int8Layout.TENSORS + ("bias", "comfy_quant")


@dataclass
class LoadedCheckpoint:
    tensors: dict[str, torch.Tensor]
    layers: dict[str, dict]              # layer name -> comfy_quant JSON
    octet: dict = field(default_factory=dict)  # Octet header (empty for foreign comfy_quant files)
    file: str = "checkpoint"                   # the file's name, for messages


def layer_spec(module: QuantLayer) -> dict:
    spec = module.layout.spec(module)
    if isinstance(module, community.RotatedQuantLinear):  # codes in ConvRot's basis: the host's keys
        spec.update(convrot=True, convrot_groupsize=module.group_size)
    return spec


def _json_tensor(obj: dict) -> torch.Tensor:
    return torch.frombuffer(bytearray(json.dumps(obj, sort_keys=True).encode()), dtype=torch.uint8).clone()


def _tensor_json(t: torch.Tensor, key: str) -> dict:
    try:
        return json.loads(bytes(t.to(torch.uint8).tolist()).decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise OctetError(f"'{key}' is not valid comfy_quant JSON ({e}); the file is damaged. Re-save it.") from e


def collect(modules: dict[str, nn.Module], state: dict[str, torch.Tensor], kind: str = fileformat.KIND_OCTET,
            float_dtype: Optional[torch.dtype] = None) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """The tensors to save (file keys) and the per-layer specs, from a model's modules by name (Quant*
    ones among them) and its state dict. ``kind="portable"`` dequantizes every layer a stock host
    cannot run to ``float_dtype``."""
    if kind not in fileformat.KINDS:
        raise OctetError(f"Unknown file kind {kind!r}; choose one of {list(fileformat.KINDS)}.")
    tensors = {k: v.detach() for k, v in state.items()}
    layers = {}
    for name, m in modules.items():
        if isinstance(m, QuantLayer):
            spec = layer_spec(m)
            if kind == fileformat.KIND_PORTABLE and not fileformat.host_runs(spec):
                for suffix in QUANT_SUFFIXES:
                    tensors.pop(f"{name}.{suffix}", None)
                dtype = float_dtype or (m.bias.dtype if m.bias is not None else torch.float32)
                tensors[f"{name}.weight"] = m.dequantized_weight(torch.float32, device=m.weight.device).to(dtype)
                if m.bias is not None:
                    tensors[f"{name}.bias"] = m.bias.detach().to(dtype)
                continue
            layers[name] = spec
            tensors[f"{name}.comfy_quant"] = _json_tensor(spec)
    if not layers and kind == fileformat.KIND_OCTET:
        raise OctetError("This model has no quantized layer to save: run Quantize Model (or load an Octet "
                         "checkpoint) first.")
    if not layers:
        raise OctetError("A portable file keeps only unsmoothed Linear layers in INT8, and this model has none "
                         "(only convs or SmoothQuant layers): it would be a float file. Save it with kind=octet, "
                         "or quantize Linear layers without SmoothQuant.")
    tensors = {(fileformat.file_key(k) if k.rpartition(".")[0] in layers else k): v for k, v in tensors.items()}
    return tensors, layers


def save(path: str, model: nn.Module, octet_meta: dict, kind: str = fileformat.KIND_OCTET,
         float_dtype: Optional[torch.dtype] = None) -> dict:
    """``save_parts`` for a module that holds its quantized layers itself."""
    return save_parts(path, dict(model.named_modules()), model.state_dict(), octet_meta, kind, float_dtype)


def save_parts(path: str, modules: dict[str, nn.Module], state: dict[str, torch.Tensor], octet_meta: dict,
               kind: str = fileformat.KIND_OCTET, float_dtype: Optional[torch.dtype] = None) -> dict:
    """Save a quantized model atomically; returns the header metadata written.

    ``kind``: "octet" (everything as quantized; stock loaders refuse it) or "portable" (what stock
    ComfyUI runs; see octet/fileformat.py). ``float_dtype``: the source model's float dtype, for every
    tensor of a layer that stays float (norms, embeddings, kept layers, the layers a portable file
    dequantizes), e.g. the source file's fp16 when the model ran in fp32 (issue 15: float layers written
    as fp32 made the "INT8" file 1.18x the fp16 source). Quantized layers' own tensors are untouched.
    """
    tensors, layers = collect(modules, state, kind, float_dtype)
    tensors = {k: v.to("cpu").contiguous() for k, v in tensors.items()}
    if float_dtype is not None:
        tensors = {k: (v.to(float_dtype) if v.is_floating_point() and k.rsplit(".", 1)[0] not in layers else v)
                   for k, v in tensors.items()}
    filecheck.check_finite_for_save(tensors, f"'{os.path.basename(path)}'")
    octet_meta = {**octet_meta, filecheck.HASH_KEY: filecheck.content_hash(tensors)}   # over the file's keys
    linears = [n for n, m in modules.items() if isinstance(m, (nn.Linear, QuantLinear))]
    meta = header(layers, linears, octet_meta, kind)
    save_atomic(tensors, path, meta)
    return meta


def header(layers: dict[str, dict], linear_names: list[str], octet_meta: dict, kind: str) -> dict[str, str]:
    """The safetensors header: the host's layer table (octet/fileformat.py) and Octet's own record."""
    try:
        table = fileformat.host_layers(layers, linear_names)
    except ValueError as e:
        raise OctetError("This model has no Linear layer, so a stock ComfyUI could not be made to refuse the "
                         "Octet-only file; save it with kind=portable.") from e
    return {
        "_quantization_metadata": json.dumps({"format_version": "1.0", "layers": table}),
        "octet": json.dumps({"format_version": FORMAT_VERSION, "file_kind": kind, **octet_meta}, sort_keys=True),
    }


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

    fname = os.path.basename(path)
    octet = filecheck.parse_octet_header(fname, header)
    version = octet.get("format_version")
    if octet and version > FORMAT_VERSION:
        raise OctetError(f"'{fname}' uses Octet format version {version!r}; this Octet reads up to "
                         f"{FORMAT_VERSION}. Update the Octet node pack.")
    # The content hash covers the tensors as stored (file keys), so it is checked before any renaming.
    filecheck.check_hash(fname, octet, tensors)
    layers = filecheck.parse_layer_specs(fname, tensors, _tensor_json)
    if octet:
        # Octet's own per-layer specs are the comfy_quant tensors; the header's table is for stock hosts.
        tensors = fileformat.module_keys(tensors, layers, version)
    else:
        layers = _host_layer_table(header, layers, fname)
        tensors = _drop_host_ignored(tensors, layers, fname)
    if not layers:
        raise OctetError(f"'{fname}' holds no quantized layers (no '.comfy_quant' entries): it is "
                         f"not an Octet/comfy_quant INT8 checkpoint. Load a float model with ComfyUI's 'Load "
                         f"Diffusion Model' node, then use Octet's Quantize Model.")
    validate(fname, octet, layers, tensors)
    return LoadedCheckpoint(tensors, layers, octet, fname)


def validate(fname: str, octet: dict, layers: dict, tensors: dict) -> None:
    """The one validation pass (octet/filecheck.py) over header and tensors (module keys), before
    anything is built; the content hash is checked by ``read`` on the stored keys."""
    groups = filecheck.check_timestep_groups(fname, octet["timestep_groups"]) if octet.get("timestep_groups") else None
    for name, spec in layers.items():
        filecheck.check_layer(fname, name, spec, tensors, KNOWN_FORMATS, OCTET_FORMAT, groups, bool(octet))
        if not octet:
            community.check_layer(name, spec, tensors[f"{name}.weight"], fname)
    filecheck.check_plain_tensors(fname, tensors, {f"{n}.{s}" for n in layers for s in QUANT_SUFFIXES if s != "bias"})
    if isinstance(octet.get("unet_config"), dict):
        filecheck.check_architecture(fname, octet["unet_config"], {k: tuple(v.shape) for k, v in tensors.items()})


def _host_layer_table(header: dict, layers: dict[str, dict], fname: str) -> dict[str, dict]:
    """A foreign file's layer specs as a stock ComfyUI reads them: the header's
    ``_quantization_metadata`` layers override the comfy_quant tensors (comfy.utils.convert_old_quants)."""
    if "_quantization_metadata" not in header:
        return layers
    try:
        table = json.loads(header["_quantization_metadata"])["layers"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise OctetError(f"'{fname}' has a damaged '_quantization_metadata' header ({type(e).__name__}: {e}).") from e
    return {**layers, **{name: dict(spec) for name, spec in table.items()}}


def _drop_host_ignored(tensors: dict, layers: dict, fname: str) -> dict:
    """int8_tensorwise layers in a foreign file: the host reads only weight and weight_scale, so
    input_scale/pre_quant_scale (host meaning, not Octet's) must not change Octet's numbers either."""
    ignored = [k for k in tensors if k.rpartition(".")[0] in layers
               and layers[k.rpartition(".")[0]].get("format") == HOST_FORMAT
               and k.rpartition(".")[2] in ("input_scale", "pre_quant_scale")]
    if ignored:
        log.warning("Octet: '%s' carries %d input_scale/pre_quant_scale tensors on int8_tensorwise layers (e.g. %s); "
                    "ComfyUI ignores them for this format and so does Octet.", fname, len(ignored), ignored[0])
    return {k: v for k, v in tensors.items() if k not in ignored}


def build_layer(name: str, spec: dict, tensors: dict, like: Optional[nn.Module] = None,
                selector=None, backend: str = "auto") -> QuantLayer:
    """A Quant* module from checkpoint tensors; ``like`` (the float/meta layer) supplies conv geometry."""
    extra = spec.get("octet", {})
    w = tensors[f"{name}.weight"]
    # A per-tensor scale from another tool is the same numbers as per-channel (octet/community.py).
    scale = community.per_row_scale(tensors[f"{name}.weight_scale"], w.shape[0])
    bias = tensors.get(f"{name}.bias")
    layout = FILE_FORMATS[spec["format"]].from_spec(spec, w)
    kind, act = layout.kind, layout.act
    group = community.convrot_group_size(spec)
    if group is not None:  # ConvRot: the codes are in a rotated basis; rotate activations per call
        layer = community.RotatedQuantLinear(w, scale, bias, act, backend, group_size=group)
    elif kind == "linear":
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
        # Host op classes (e.g. 0.29's mixed-precision Linear) need not subclass nn.Linear.
        if not (isinstance(modules[name], (nn.Linear, nn.Conv2d, QuantLayer))
                or type(modules[name]).__name__ in ("Linear", "Conv2d")):
            raise OctetError(f"Layer '{name}' is INT8 in the file but a {type(modules[name]).__name__} in this "
                             f"model; Octet runs INT8 Linear and Conv2d layers only. Load the file with ComfyUI's "
                             f"'Load Diffusion Model' node.")
        filecheck.check_layer_fits(ckpt.file, name, modules[name], ckpt.tensors)
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
    deferred.install(model)
    float_fusions.install(model)
    lean_blocks.install(model)
    shared_input.attach(model)
