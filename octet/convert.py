"""Convert a safetensors diffusion-model file to an Octet or portable INT8 file, one layer at a time.

Memory stays at about one layer: tensors are read one by one (octet/streamfile.py), each
Linear/Conv2d weight is quantized on its own, and the output is streamed into a file whose header
is planned before any data is read. Layers are recognised from the state dict itself (a floating
``L.weight`` of rank 2 is a Linear, rank 4 a Conv2d); the policy, the mode and the calibration work
as in the Quantize Model node. Conv geometry (stride, padding) is not in a state dict; Octet's
loader takes it from the architecture it rebuilds. Beside the output goes a model card
(``<output>.md``): source sha256, method, policy, sizes.

The command line is ``python -m scripts.convert`` from the repository root (scripts/convert.py).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn as nn

from . import checkpoint, fileformat
from .api import OctetError, smoothing_for
from .config import QuantConfig
from .modules import QuantConv2d, QuantLinear
from .streamfile import StreamWriter, read_tensor, tensor_info


@dataclass
class LayerPlan:
    name: str
    kind: str                      # "linear" | "conv"
    config: Optional[QuantConfig]  # None: copied as it is
    reason: str = ""
    output: str = "copy"           # "int8" | "copy" (as in the source)


@dataclass
class ConvertResult:
    output: str
    card: str
    layers: list[LayerPlan] = field(default_factory=list)
    source_bytes: int = 0
    output_bytes: int = 0
    seconds: float = 0.0


def sha256(path: str, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _layer_kind(dtype: torch.dtype, shape: tuple) -> Optional[str]:
    if not dtype.is_floating_point:
        return None
    return {2: "linear", 4: "conv"}.get(len(shape))


def plan_layers(info: dict, config: QuantConfig, policy=None, kind: str = fileformat.KIND_OCTET) -> list[LayerPlan]:
    plans = []
    for key, (dtype, shape) in info.items():
        if not key.endswith(".weight") or (lk := _layer_kind(dtype, shape)) is None or 0 in shape:
            continue
        name = key[: -len(".weight")]
        cfg, reason = (policy.decide(name, None, config) if policy is not None else (config, ""))
        if cfg is None:
            plans.append(LayerPlan(name, lk, None, reason or "kept in float by policy"))
        elif lk not in cfg.kinds:
            plans.append(LayerPlan(name, lk, None, f"kind '{lk}' not selected"))
        else:
            host_ok = lk == "linear" and getattr(cfg, "smooth_alpha", None) is None
            if kind == fileformat.KIND_OCTET or host_ok:
                plans.append(LayerPlan(name, lk, cfg, reason, "int8"))
            else:  # the source weights are at hand: better than a dequantized copy of them
                plans.append(LayerPlan(name, lk, None, "portable: stock ComfyUI runs no INT8 "
                                       + ("conv" if lk == "conv" else "SmoothQuant layer") + "; kept as in the source"))
    return plans


def _quantize(plan: LayerPlan, weight: torch.Tensor, bias: Optional[torch.Tensor], calibration):
    """One Quant* layer from a float weight, as octet.api._build does for a module."""
    cfg = plan.config
    if plan.kind == "linear":
        module = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    else:
        module = nn.Conv2d(weight.shape[1], weight.shape[0], tuple(weight.shape[2:]), bias=bias is not None,
                           device="meta")
    module.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        module.bias = nn.Parameter(bias, requires_grad=False)
    smooth = None
    if cfg.act == "static" or getattr(cfg, "smooth_alpha", None) is not None:
        if calibration is None:
            raise OctetError(f"Mode '{cfg.mode}' needs a calibration file (--calibration) for layer '{plan.name}'.")
        smooth = smoothing_for(module, cfg, plan.name, calibration)
    cls = QuantLinear if plan.kind == "linear" else QuantConv2d
    q = cls.from_float(module, cfg.act, cfg.backend, smooth=smooth)
    if cfg.act == "static":
        q.set_static_scales(calibration.input_scales(plan.name, cfg, smooth=smooth))
    return q


def _entries(plan: LayerPlan, info: dict, calibration, kind: str) -> dict:
    """The output keys of one layer with their dtype and shape, known before its data is read."""
    n = plan.name
    dtype, shape = info[f"{n}.weight"]
    out = {f"{n}.weight": (torch.int8, shape), f"{n}.weight_scale": (torch.float32, (shape[0], 1))}
    if f"{n}.bias" in info:
        out[f"{n}.bias"] = info[f"{n}.bias"]
    cfg = plan.config
    if getattr(cfg, "smooth_alpha", None) is not None:
        out[fileformat.file_key(f"{n}.pre_quant_scale")] = (torch.float32, (shape[1],))
    if cfg.act == "static":
        groups = calibration.groups if getattr(cfg, "timestep_groups", False) else 1
        out[fileformat.file_key(f"{n}.input_scale")] = (torch.float32, (groups,))
    out[f"{n}.comfy_quant"] = (torch.uint8, (len(_spec_bytes(plan, calibration)),))
    return out


def _spec_bytes(plan: LayerPlan, calibration) -> bytes:
    cfg = plan.config
    host = plan.kind == "linear" and getattr(cfg, "smooth_alpha", None) is None
    spec = {"format": fileformat.HOST_FORMAT if host else fileformat.OCTET_FORMAT,
            "octet": {"kind": plan.kind, "act": cfg.act}}
    if cfg.act == "static":
        spec["octet"]["timestep_groups"] = bool(getattr(cfg, "timestep_groups", False))
    return json.dumps(spec, sort_keys=True).encode()


def convert(source: str, output: str, config: QuantConfig, *, policy=None, calibration=None,
            kind: str = fileformat.KIND_OCTET, progress: Optional[Callable[[int, int, str], None]] = None,
            overwrite: bool = False, architecture: Optional[str] = None) -> ConvertResult:
    """``architecture``: the host's model-config class name (e.g. "SDXL") to record; without it
    Octet's loader detects the architecture from the state dict, as the host's own loader does."""
    start = time.perf_counter()
    if kind not in fileformat.KINDS:
        raise OctetError(f"Unknown file kind {kind!r}; choose one of {list(fileformat.KINDS)}.")
    if not os.path.isfile(source):
        raise OctetError(f"No file at '{source}': pass a safetensors diffusion-model file.")
    if os.path.exists(output) and not overwrite:
        raise OctetError(f"'{output}' already exists; choose another output or pass --overwrite.")
    try:
        info, src_meta = tensor_info(source)
    except Exception as e:
        raise OctetError(f"'{source}' is not a readable safetensors file ({type(e).__name__}: {e}).") from e
    if any(k.endswith(".comfy_quant") for k in info):
        raise OctetError(f"'{source}' is already quantized (it has comfy_quant layers); convert the float model.")
    plans = plan_layers(info, config, policy, kind)
    int8 = [p for p in plans if p.output == "int8"]
    if not int8:
        raise OctetError(f"No layer of '{source}' would be INT8 with this mode, policy and kind: nothing to convert. "
                         f"Check the policy rules and the layer kinds.")
    by_name = {p.name: p for p in plans}

    # The header first: every output key in source order, a layer's keys where its weight was.
    layout: dict = {}
    for key, (dtype, shape) in info.items():
        layer, _, suffix = key.rpartition(".")
        p = by_name.get(layer)
        if p is not None and p.output != "copy" and suffix in ("weight", "bias"):
            if suffix == "weight":
                layout.update(_entries(p, info, calibration, kind))
            continue
        layout[key] = (dtype, shape)
    linear_names = [p.name for p in plans if p.kind == "linear"]
    layers = {p.name: json.loads(_spec_bytes(p, calibration)) for p in int8}
    octet_meta = {"mode": config.mode,
                  "config": config.to_dict(), "policy": getattr(policy, "name", None),
                  "source_hash": None, "converter": "octet.convert"}
    source_hash = sha256(source)
    octet_meta["source_hash"] = source_hash
    if architecture:
        octet_meta["architecture"] = architecture
    meta = checkpoint.header(layers, linear_names, octet_meta, kind)

    done = 0
    with StreamWriter(output, layout, meta) as w:
        for key in layout:
            layer, _, suffix = key.rpartition(".")
            p = by_name.get(layer)
            if p is None or p.output == "copy":
                w.write(key, read_tensor(source, key))
                continue
            if suffix != "weight":
                continue  # written with its layer below
            weight = read_tensor(source, key)
            bias = read_tensor(source, f"{layer}.bias") if f"{layer}.bias" in info else None
            q = _quantize(p, weight.float(), None if bias is None else bias, calibration)
            tensors = {f"{layer}.weight": q.weight.data, f"{layer}.weight_scale": q.weight_scale,
                       f"{layer}.bias": bias,
                       fileformat.file_key(f"{layer}.pre_quant_scale"): q.pre_quant_scale,
                       fileformat.file_key(f"{layer}.input_scale"): q.input_scale,
                       f"{layer}.comfy_quant": torch.frombuffer(bytearray(_spec_bytes(p, calibration)),
                                                                dtype=torch.uint8)}
            for k in _entries(p, info, calibration, kind):
                w.write(k, tensors[k])
            del weight, bias, q
            done += 1
            if progress is not None:
                progress(done, len([x for x in plans if x.output != "copy"]), layer)

    result = ConvertResult(output, output[: -len(".safetensors")] + ".md" if output.endswith(".safetensors")
                           else output + ".md", plans, os.path.getsize(source), os.path.getsize(output))
    result.seconds = time.perf_counter() - start
    _write_card(result, source, source_hash, config, policy, kind, calibration)
    return result


def _write_card(r: ConvertResult, source: str, source_hash: str, config, policy, kind, calibration) -> None:
    counts = {}
    for p in r.layers:
        key = (p.kind, p.output if p.config is not None else "float (kept)")
        counts[key] = counts.get(key, 0) + 1
    kept = [p for p in r.layers if p.config is None]
    lines = [
        f"# {os.path.basename(r.output)}",
        "",
        f"INT8 conversion made with Octet's converter (`python -m scripts.convert`).",
        "",
        "| | |", "|---|---|",
        f"| source | `{os.path.basename(source)}` |",
        f"| source sha256 | `{source_hash}` |",
        f"| file kind | {kind}: " + ("only Octet's Load Quantized runs it; stock loaders refuse it" if kind == "octet"
                                    else "stock ComfyUI 0.29+ 'Load Diffusion Model' runs it; Octet too") + " |",
        f"| method | {config.mode} ({json.dumps(config.to_dict(), sort_keys=True)}) |",
        f"| policy | {getattr(policy, 'name', None) or 'none (every selected layer)'} |",
        f"| calibration | {'yes: ' + json.dumps(calibration.summary().get('fingerprint')) if calibration else 'none'} |",
        f"| source size | {r.source_bytes / 2**20:.1f} MiB |",
        f"| output size | {r.output_bytes / 2**20:.1f} MiB ({r.output_bytes / max(r.source_bytes, 1):.3f}x) |",
        f"| conversion time | {r.seconds:.1f} s |",
        "",
        "| layer kind | stored as | layers |", "|---|---|---|",
        *[f"| {k} | {o} | {n} |" for (k, o), n in sorted(counts.items())],
        "",
    ]
    if kept:
        lines += ["Kept in float:", "", *[f"- `{p.name}`: {p.reason}" for p in kept[:200]], ""]
    with open(r.card, "w") as f:
        f.write("\n".join(lines))
