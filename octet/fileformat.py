"""What an Octet file holds, and how a stock ComfyUI loader sees it (pure functions, no ComfyUI import).

Two kinds of file, both safetensors in the host's ``comfy_quant`` convention:

* ``octet`` (the full format): every layer as Octet quantized it (INT8 convs, static W8A8 with
  timestep groups, SmoothQuant, weight-only). Only Octet's Load Quantized runs it. A stock loader
  must *refuse* it, never load it silently wrong: a stock ComfyUI loads a conv's int8 codes as
  float weights (NaN images) and knows none of Octet's extras. So the header's
  ``_quantization_metadata`` (which a stock host applies over the per-layer ``comfy_quant``
  tensors) names every layer the host cannot run, and at least one Linear, with the format
  ``HOST_REFUSAL``: the host's mixed-precision Linear looks that name up in its format table and
  stops with ``KeyError: 'octet_int8 (needs the Octet node pack ...)'``, a message a user can act on.
* ``portable``: what stock ComfyUI (0.29+, comfy-kitchen) runs correctly: Linear layers with a
  per-row weight scale as ``int8_tensorwise``, every other layer dequantized to the source float
  dtype. Octet's own extras stay only where the host ignores them (``octet_input_scale`` keys and
  the ``octet`` field inside ``comfy_quant``), so Octet reloads static layers as static.

Octet-only tensors use Octet-namespaced keys in files of format version 2: ``L.octet_smooth``
(the SmoothQuant divisor; the host's ``pre_quant_scale`` is a *multiplier*, the opposite) and
``L.octet_input_scale`` (per timestep group; the host's ``input_scale`` is one per-tensor scale).
Version 1 files used the host's names with Octet's meaning; they are read as before.
"""
from __future__ import annotations

import torch

KIND_OCTET = "octet"
KIND_PORTABLE = "portable"
KINDS = (KIND_OCTET, KIND_PORTABLE)

HOST_FORMAT = "int8_tensorwise"
OCTET_FORMAT = "octet_int8"
# What a stock host finds in its format table lookup for a layer it cannot run (see module docstring).
HOST_REFUSAL = ("octet_int8 (this file needs the Octet node pack: load it with 'Load Quantized (INT8)', "
                "or re-save it with Save Quantized kind=portable for stock ComfyUI)")

# Module buffer name -> file key suffix, per Octet format version.
_FILE_SUFFIX = {
    1: {"pre_quant_scale": "pre_quant_scale", "input_scale": "input_scale"},
    2: {"pre_quant_scale": "octet_smooth", "input_scale": "octet_input_scale"},
}
LATEST_VERSION = 2


def file_key(module_key: str, version: int = LATEST_VERSION) -> str:
    """The key a module state-dict entry gets in a file of this Octet format version."""
    layer, _, suffix = module_key.rpartition(".")
    mapped = _FILE_SUFFIX[version].get(suffix)
    return f"{layer}.{mapped}" if mapped else module_key


def module_keys(tensors: dict[str, torch.Tensor], layers, version: int) -> dict[str, torch.Tensor]:
    """File keys of the quantized ``layers`` back to module state-dict names (inverse of file_key)."""
    inverse = {v: k for k, v in _FILE_SUFFIX[version].items()}
    out = {}
    for key, t in tensors.items():
        layer, _, suffix = key.rpartition(".")
        out[f"{layer}.{inverse[suffix]}" if layer in layers and suffix in inverse else key] = t
    return out


def host_runs(spec: dict) -> bool:
    """Whether a stock host computes this layer as Octet does (given the layer's comfy_quant spec)."""
    return spec.get("format") == HOST_FORMAT


def host_layers(layers: dict[str, dict], linear_names: list[str]) -> dict[str, dict]:
    """The ``_quantization_metadata`` layer table a stock host will act on.

    Layers the host runs keep their format; any other makes the whole file refused (a file that
    loads with some layers wrong is worse than one that does not load), through a Linear.
    """
    # The host applies this table over the comfy_quant tensors, so a layer it runs keeps every key it
    # reads (e.g. ConvRot's); Octet's own "octet" field stays in the tensors only.
    table = {n: ({k: v for k, v in s.items() if k != "octet"} if host_runs(s) else {"format": HOST_REFUSAL})
             for n, s in layers.items()}
    refused = [n for n, s in layers.items() if not host_runs(s)]
    if refused and not any(table.get(n, {}).get("format") == HOST_REFUSAL for n in linear_names):
        if not linear_names:
            raise ValueError("no Linear layer to carry the stock-loader refusal")
        table[linear_names[0]] = {"format": HOST_REFUSAL}
    return table


def describe(header_octet: dict, layers: dict[str, dict]) -> str:
    """One line saying which kind of file this is, for the Load/Save nodes."""
    kind = header_octet.get("file_kind")
    n = len(layers)
    if not header_octet:
        rot = sum(1 for s in layers.values() if s.get("convrot") or (s.get("params") or {}).get("convrot"))
        extra = f", {rot} with ConvRot" if rot else ""
        return f"community int8_tensorwise file ({n} INT8 layers{extra}); stock ComfyUI 0.29+ runs it too"
    if kind == KIND_PORTABLE:
        return (f"Octet portable file ({n} int8_tensorwise Linear layers, the rest float): stock ComfyUI 0.29+ "
                f"'Load Diffusion Model' runs it")
    version = header_octet.get("format_version")
    own = sum(1 for s in layers.values() if not host_runs(s))
    if version == 1 and own:
        return (f"Octet file, format version 1 ({n} INT8 layers, {own} Octet-only): only Octet's Load Quantized "
                f"runs it; stock loaders fail on it (KeyError 'octet_int8') or load its convs wrongly")
    return (f"Octet file ({n} INT8 layers, {own} Octet-only): only Octet's Load Quantized runs it; stock "
            f"'Load Diffusion Model' refuses it" if own else
            f"Octet file ({n} int8_tensorwise layers): stock ComfyUI 0.29+ runs it too")
