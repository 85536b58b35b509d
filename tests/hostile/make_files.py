"""Damaged and forged variants of a valid small checkpoint and calibration (issue 17).

``checkpoint_cases()`` / ``calibration_cases()`` list ``Case``s: a name, what the hostile user did,
the expected outcome ("error": an OctetError; "load": a correct load) and a function that turns the
valid file's (tensors, header) into the damaged one, or its bytes into damaged bytes. Forged files
are written with safetensors' own writer, as another tool would. Header-level tensor edits drop the
content hash (as files from other tools or older Octet have none), so each check is shown to hold on
its own; ``bitflip_*`` keep the hash, which is what catches them.

Used by test_hostile_files.py (each case a test) and report.py (docs/HOSTILE.md).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch

HASH_KEY = "content_hash"


@dataclass(frozen=True)
class Case:
    name: str
    what: str
    expect: str                                  # "error" | "load"
    edit: Optional[Callable] = None              # (tensors, header) -> None, in place
    raw: Optional[Callable[[bytes], bytes]] = None
    match: str = ""                              # a regex the OctetError must match
    keep_hash: bool = False


SETTINGS = {"observer": "mse", "percentile": 99.99, "timestep_groups": True, "smooth_alpha": 0.5}


def build_valid_files(folder: str) -> dict:
    """A static W8A8 (timestep groups, SmoothQuant) checkpoint of the embedded tiny SD15 model and its
    calibration, saved by Octet: the valid files every hostile case starts from."""
    from comfyui_octet.nodes import bridge, calibrate_nodes, model_files
    from comfyui_octet.fixtures import reference_model
    from comfyui_octet.octet import StaticW8A8Config

    model = reference_model.build_tiny_sd15()
    pos = reference_model.tiny_conditioning(batch=1, seed=1)
    neg = reference_model.tiny_conditioning(batch=1, seed=2)
    cal, _ = calibrate_nodes.calibrate(model, pos, neg, {"samples": torch.zeros(1, 4, 8, 8)}, 7, 6, 4.0, "euler",
                                       "normal", 3)
    q, _ = bridge.quantize_model(model, StaticW8A8Config(**SETTINGS), calibration=cal)
    os.makedirs(folder, exist_ok=True)
    ckpt, calib = os.path.join(folder, "valid_ckpt.safetensors"), os.path.join(folder, "valid_cal.safetensors")
    model_files.save_model(q, ckpt)
    cal.save(calib)
    return {"checkpoint": ckpt, "calibration": calib, "model": model, "quantized": q, "conds": (pos, neg)}


# -- reading and writing ---------------------------------------------------------------------------
def read(path: str) -> tuple[dict, dict]:
    from safetensors import safe_open
    with safe_open(path, framework="pt", device="cpu") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def write_case(case: Case, valid_path: str, out_path: str) -> str:
    """Write ``case``'s variant of the file at ``valid_path`` to ``out_path``."""
    from safetensors.torch import save_file
    if case.raw is not None:
        with open(valid_path, "rb") as f:
            data = case.raw(f.read())
        with open(out_path, "wb") as f:
            f.write(data)
        return out_path
    tensors, header = read(valid_path)
    if "octet" in header and not case.keep_hash:
        octet = json.loads(header["octet"])
        octet.pop(HASH_KEY, None)
        header["octet"] = json.dumps(octet)
    case.edit(tensors, header)
    save_file({k: v.contiguous() for k, v in tensors.items()}, out_path, metadata=header)
    return out_path


# -- helpers for edits -------------------------------------------------------------------------------
def _octet(header: dict) -> dict:
    return json.loads(header["octet"])


def _set_octet(header: dict, **changes) -> None:
    o = _octet(header)
    for k, v in changes.items():
        if v is _DELETE:
            o.pop(k, None)
        else:
            o[k] = v
    header["octet"] = json.dumps(o)


def _unet(header: dict, **changes) -> None:
    o = _octet(header)
    o["unet_config"].update(changes)
    header["octet"] = json.dumps(o)


_DELETE = object()


def _spec_tensor(obj) -> torch.Tensor:
    return torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8).clone()


def _spec(t: torch.Tensor):
    return json.loads(bytes(t.tolist()).decode())


def _stored(suffix: str) -> str:
    """The key suffix a module tensor has in the file (format v2 stores Octet-only tensors under
    Octet names: pre_quant_scale -> octet_smooth, input_scale -> octet_input_scale)."""
    from comfyui_octet.octet import fileformat
    return fileformat.file_key("x." + suffix).rpartition(".")[2]


def first_layer(tensors: dict, suffix: str) -> str:
    """The first (sorted) quantized layer that has ``<layer>.<suffix>`` (a module key suffix)."""
    suffix = _stored(suffix)
    return sorted(k[: -len(suffix) - 1] for k in tensors if k.endswith("." + suffix)
                  and k[: -len(suffix) - 1] + ".comfy_quant" in tensors)[0]


def _tensor_edit(suffix: str, fn):
    def edit(tensors, header):
        key = f"{first_layer(tensors, suffix)}.{_stored(suffix)}"
        tensors[key] = fn(tensors[key])
    return edit


def _drop(suffix: str):
    def edit(tensors, header):
        del tensors[f"{first_layer(tensors, suffix)}.{_stored(suffix)}"]
    return edit


def _spec_edit(fn, suffix: str = "input_scale"):
    def edit(tensors, header):
        key = f"{first_layer(tensors, suffix)}.comfy_quant"
        tensors[key] = _spec_tensor(fn(_spec(tensors[key])))
    return edit


def _flip_bit(offset_from_end: int):
    def raw(data: bytes) -> bytes:
        b = bytearray(data)
        b[len(b) - offset_from_end] ^= 0x10
        return bytes(b)
    return raw


def _plain_key(tensors: dict) -> str:
    quant = {k.rsplit(".", 1)[0] for k in tensors if k.endswith(".comfy_quant")}
    return sorted(k for k in tensors if k.rsplit(".", 1)[0] not in quant and k.endswith(".weight"))[0]


def _plain_edit(fn):
    def edit(tensors, header):
        key = _plain_key(tensors)
        tensors[key] = fn(tensors[key])
    return edit


def _nan_at0(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[0] = float("nan")
    return t


# -- checkpoint cases ------------------------------------------------------------------------------
def checkpoint_cases() -> list[Case]:
    E = "error"
    return [
        # tensors of a quantized layer
        Case("bias_missing", "a quantized layer's bias deleted", E, _drop("bias"), match="has no '.*bias'"),
        Case("pre_quant_scale_missing", "SmoothQuant divisor deleted", E, _drop("pre_quant_scale"),
             match="pre_quant_scale is missing"),
        Case("pre_quant_scale_nan", "pre_quant_scale NaN", E, _tensor_edit("pre_quant_scale", _nan_at0),
             match="pre_quant_scale ranges"),
        Case("pre_quant_scale_inf", "pre_quant_scale inf", E,
             _tensor_edit("pre_quant_scale", lambda t: t * float("inf")), match="pre_quant_scale ranges"),
        Case("pre_quant_scale_zero", "pre_quant_scale 0", E, _tensor_edit("pre_quant_scale", lambda t: t * 0),
             match="pre_quant_scale ranges"),
        Case("pre_quant_scale_negative", "pre_quant_scale negative", E,
             _tensor_edit("pre_quant_scale", lambda t: -t), match="pre_quant_scale ranges"),
        Case("pre_quant_scale_wrong_length", "pre_quant_scale one value short", E,
             _tensor_edit("pre_quant_scale", lambda t: t[:-1]), match="pre_quant_scale has shape"),
        Case("input_scale_wrong_length", "input_scale with one group too many", E,
             _tensor_edit("input_scale", lambda t: torch.cat([t, t[:1]])), match="input_scale has shape"),
        Case("input_scale_missing", "a static layer's input_scale deleted", E, _drop("input_scale"),
             match="no input_scale"),
        Case("input_scale_nan", "input_scale NaN", E, _tensor_edit("input_scale", _nan_at0), match="input_scale ranges"),
        Case("input_scale_zero", "input_scale 0", E, _tensor_edit("input_scale", lambda t: t * 0),
             match="input_scale ranges"),
        Case("weight_scale_int32", "weight_scale stored as int32", E,
             _tensor_edit("weight_scale", lambda t: t.view(torch.int32)), match="stored as torch.int32"),
        Case("weight_scale_1e30", "weight_scale 1e30", E, _tensor_edit("weight_scale", lambda t: t * 0 + 1e30),
             match="weight_scale ranges"),
        Case("weight_scale_1e-30", "weight_scale 1e-30", E, _tensor_edit("weight_scale", lambda t: t * 0 + 1e-30),
             match="weight_scale ranges"),
        Case("weight_scale_x1e6", "weight_scale multiplied by 1e6", E, _tensor_edit("weight_scale", lambda t: t * 1e6),
             match="weight_scale ranges"),
        Case("weight_scale_nan", "weight_scale NaN", E, _tensor_edit("weight_scale", _nan_at0),
             match="weight_scale ranges"),
        Case("weight_scale_wrong_length", "weight_scale one row short", E,
             _tensor_edit("weight_scale", lambda t: t[:-1]), match="weight_scale has shape"),
        Case("weight_float", "int8 weight replaced by float", E, _tensor_edit("weight", lambda t: t.float()),
             match="expected int8"),
        Case("weight_missing", "a quantized layer's weight deleted", E, _drop("weight"), match="lacks its weight"),
        Case("bias_nan", "bias NaN", E, _tensor_edit("bias", _nan_at0), match="bias holds"),
        Case("bias_wrong_length", "bias one short", E, _tensor_edit("bias", lambda t: t[:-1]), match="bias is"),
        # comfy_quant records
        Case("static_without_octet_record", "static layer's comfy_quant without its Octet record", E,
             _spec_edit(lambda s: {"format": s["format"]}), match="no Octet record"),
        Case("static_record_says_dynamic", "static layer's record edited to act=dynamic", E,
             _spec_edit(lambda s: {**s, "octet": {**s["octet"], "act": "dynamic"}}), match="act='dynamic'"),
        Case("comfy_quant_list", "comfy_quant JSON is a list", E, _spec_edit(lambda s: [s]), match="expected a JSON object"),
        Case("comfy_quant_not_json", "comfy_quant bytes are not JSON", E,
             lambda t, h: t.__setitem__(f"{first_layer(t, 'weight')}.comfy_quant", torch.tensor([1, 2, 255],
                                                                                               dtype=torch.uint8)),
             match="not valid comfy_quant JSON"),
        Case("octet_record_list", "the Octet record inside comfy_quant is a list", E,
             _spec_edit(lambda s: {**s, "octet": [1]}), match="Octet record"),
        Case("format_unknown", "comfy_quant format 'fp4_magic'", E, _spec_edit(lambda s: {**s, "format": "fp4_magic"}),
             match="uses format"),
        Case("act_unknown", "act 'turbo'", E, _spec_edit(lambda s: {**s, "octet": {**s["octet"], "act": "turbo"}}),
             match="act 'turbo'"),
        Case("conv_stride_string", "a conv layer's stride is a string", E,
             _spec_edit(lambda s: {**s, "octet": {**s["octet"], "stride": "abc"}}), match="conv stride"),
        Case("conv_groups_zero", "a conv layer's groups is 0", E,
             _spec_edit(lambda s: {**s, "octet": {**s["octet"], "groups": 0}}), match="conv groups"),
        Case("kind_mismatch", "a layer's kind swapped (conv <-> linear)", E,
             _spec_edit(lambda s: {**s, "octet": {**s["octet"],
                                                  "kind": "linear" if s["octet"]["kind"] == "conv" else "conv"}}),
             match="kind '(conv|linear)' with a weight"),
        # other tensors
        Case("plain_nan", "NaN in an unquantized weight", E, _plain_edit(_nan_at0), match="NaN/inf"),
        Case("plain_int32", "an unquantized weight stored as int32", E, _plain_edit(lambda t: t.to(torch.int32)),
             match="unquantized tensors are floating point"),
        # the Octet header
        Case("header_list", "Octet header is a JSON list", E, lambda t, h: h.__setitem__("octet", "[1, 2]"),
             match="expected a JSON object"),
        Case("header_not_json", "Octet header is not JSON", E, lambda t, h: h.__setitem__("octet", "{nope"),
             match="damaged Octet header"),
        Case("unet_config_missing", "unet_config deleted from the header", E,
             lambda t, h: _set_octet(h, unet_config=_DELETE), match="unet_config"),
        Case("unet_config_list", "unet_config is a list", E, lambda t, h: _set_octet(h, unet_config=[1]),
             match="unet_config is"),
        Case("architecture_module", "architecture names a module, not a model class", E,
             lambda t, h: _set_octet(h, architecture="torch"), match="does not know"),
        Case("architecture_unknown", "architecture 'NotAModel'", E, lambda t, h: _set_octet(h, architecture="NotAModel"),
             match="does not know"),
        Case("architecture_path", "architecture '../../x'", E, lambda t, h: _set_octet(h, architecture="../../x"),
             match="not a model class name"),
        Case("blocks_8000", "header claims 8000 res blocks per level", E,
             lambda t, h: _unet(h, num_res_blocks=[8000, 8000]), match="claims 16000 blocks"),
        Case("depth_8000", "header claims transformer depth 8000", E,
             lambda t, h: _unet(h, transformer_depth=[8000] * 4), match="claims 32000 blocks"),
        Case("channels_negative", "model_channels -32", E, lambda t, h: _unet(h, model_channels=-32), match="negative"),
        Case("channels_absurd", "model_channels 10**9", E, lambda t, h: _unet(h, model_channels=10**9),
             match="larger than any tensor"),
        Case("channels_string", "model_channels '32'", E, lambda t, h: _unet(h, model_channels="32"),
             match="does not build|not a number"),
        Case("channel_mult_empty", "channel_mult []", E, lambda t, h: _unet(h, channel_mult=[]),
             match="does not build|does not fit"),
        # SD15's model class fixes num_heads itself, so the header's value is not used: a correct load
        Case("heads_zero", "num_heads 0 (SD15 ignores the header's value)", "load", lambda t, h: _unet(h, num_heads=0)),
        Case("context_dim_other", "context_dim 128 (another model's)", E, lambda t, h: _unet(h, context_dim=128),
             match="does not fit"),
        # The architecture is rebuilt through the host's detection from the tensors (nodes/host_compat.py),
        # which has no label embedding here: the forged header field is ignored and the file loads right.
        Case("class_conditional_forged", "num_classes 'sequential' (a class-conditional model; detection "
             "ignores it)", "load", lambda t, h: _unet(h, num_classes="sequential", adm_in_channels=64)),
        Case("timestep_groups_strings", "timestep_groups boundaries are strings", E,
             lambda t, h: _set_octet(h, timestep_groups={"boundaries": ["1.0", "5.0"]}), match="timestep_groups is"),
        Case("timestep_groups_list", "timestep_groups is a list", E,
             lambda t, h: _set_octet(h, timestep_groups=[1.0]), match="timestep_groups is"),
        Case("timestep_groups_descending", "boundaries descending", E,
             lambda t, h: _set_octet(h, timestep_groups={"boundaries": [5.0, 1.0]}), match="timestep_groups is"),
        Case("format_version_string", "format_version '1'", E, lambda t, h: _set_octet(h, format_version="1"),
             match="format version"),
        Case("format_version_future", "format_version 99", E, lambda t, h: _set_octet(h, format_version=99),
             match="Update the Octet"),
        Case("mode_list", "mode is a list", E, lambda t, h: _set_octet(h, mode=["static"]), match="'mode' is"),
        Case("hash_garbage", "content_hash is a number", E, lambda t, h: _set_octet(h, content_hash=5),
             match="content_hash"),
        # the bytes of the file
        Case("bitflip_data_end", "one bit flipped in the last tensor bytes (hash kept)", E,
             raw=_flip_bit(3), match="content hash"),
        Case("bitflip_data_mid", "one bit flipped mid-file (hash kept)", E, raw=lambda b: _flip_bit(len(b) // 3)(b),
             match="content hash|NaN|ranges|JSON|not a readable|header"),
        Case("truncated", "file cut in half", E, raw=lambda b: b[: len(b) // 2], match="not a readable"),
        Case("empty_file", "zero bytes", E, raw=lambda b: b"", match="not a readable"),
        Case("garbage", "random bytes", E, raw=lambda b: bytes(range(256)) * 8, match="not a readable"),
        Case("huge_header_length", "header length field 2**60", E, raw=lambda b: (2**60).to_bytes(8, "little") + b[8:],
             match="not a readable"),
        # what must still load
        Case("valid", "the file as saved", "load", lambda t, h: None, keep_hash=True),
        Case("no_hash", "no content hash (older Octet / other tools)", "load", lambda t, h: None),
    ]


# -- calibration cases -----------------------------------------------------------------------------
def _cal_header(h: dict, **changes):
    o = json.loads(h["octet_calibration"])
    for k, v in changes.items():
        if v is _DELETE:
            o.pop(k, None)
        else:
            o[k] = v
    h["octet_calibration"] = json.dumps(o)


def _stat_edit(stat: str, fn):
    def edit(tensors, header):
        key = sorted(k for k in tensors if k.endswith("." + stat))[0]
        tensors[key] = fn(tensors[key])
    return edit


def calibration_cases() -> list[Case]:
    E = "error"
    return [
        Case("channel_absmax_zero", "channel_absmax all 0", E, _stat_edit("channel_absmax", lambda t: t * 0),
             match="absmax"),
        Case("channel_absmax_1e38", "channel_absmax 1e38", E, _stat_edit("channel_absmax", lambda t: t * 0 + 1e38),
             match="channel_absmax ranges"),
        Case("channel_absmax_negative", "channel_absmax negative", E, _stat_edit("channel_absmax", lambda t: -t),
             match="channel_absmax ranges"),
        Case("absmax_nan", "absmax NaN", E, _stat_edit("absmax", _nan_at0), match="absmax ranges"),
        Case("counts_negative", "negative counts", E, _stat_edit("count", lambda t: -t), match="count"),
        Case("calls_negative", "negative calls", E, _stat_edit("calls", lambda t: -t - 1), match="calls"),
        Case("hist_float", "hist stored as float", E, _stat_edit("hist", lambda t: t.float()), match="hist"),
        Case("stat_missing", "a layer's channel_absmax deleted", E,
             lambda t, h: t.__delitem__(sorted(k for k in t if k.endswith(".channel_absmax"))[0]),
             match="missing or malformed"),
        Case("stat_wrong_groups", "channel_absmax with a timestep group too many", E,
             _stat_edit("channel_absmax", lambda t: torch.cat([t, t[:1]], 0)), match="missing or malformed|groups"),
        Case("cal_header_list", "calibration header is a list", E, lambda t, h: h.__setitem__("octet_calibration", "[]"),
             match="expected a JSON object"),
        Case("cal_layers_missing", "header without 'layers'", E, lambda t, h: _cal_header(h, layers=_DELETE),
             match="'layers'"),
        Case("cal_layers_list", "'layers' is a list", E, lambda t, h: _cal_header(h, layers=["a"]), match="'layers'"),
        Case("cal_groups_strings", "timestep_groups boundaries are strings", E,
             lambda t, h: _cal_header(h, timestep_groups={"boundaries": ["a", "b"]}), match="timestep_groups is"),
        Case("cal_fingerprint_missing", "no fingerprint", E, lambda t, h: _cal_header(h, fingerprint=_DELETE),
             match="fingerprint"),
        Case("cal_histogram_list", "histogram layout is a list", E, lambda t, h: _cal_header(h, histogram=[1]),
             match="histogram"),
        Case("cal_info_list", "info is a list", E, lambda t, h: _cal_header(h, info=[1]), match="'info'"),
        Case("cal_truncated", "file cut in half", E, raw=lambda b: b[: len(b) // 2], match="not a readable"),
    ]


def all_names() -> list[str]:
    return [c.name for c in checkpoint_cases()] + [c.name for c in calibration_cases()]


def exists(path: str) -> bool:
    return os.path.exists(path)
