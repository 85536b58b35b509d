"""One validation pass over a checkpoint's or calibration's header and tensors, before anything is built.

Files come from other people: a damaged or forged file must give an OctetError that names the
file, the layer (or header field) and the value, and says what to do — never a raw Python error, a
model built from absurd sizes, or a model that loads and samples garbage. Everything here is a
pure function over the parsed header and the tensors (no model, no ComfyUI), so it runs in
milliseconds before the loader allocates or builds anything.

What a valid Octet checkpoint holds (see checkpoint.py for the format):
  * per quantized layer: ``weight`` int8 (2-D linear / 4-D conv), ``weight_scale`` float [N] or
    [N, 1] (or one tensorwise value) finite in ``SCALE_RANGE``, optional ``bias`` float [N],
    ``input_scale`` float [groups] for static layers, ``pre_quant_scale`` float [K] for smoothed
    ones, and a ``comfy_quant`` JSON object;
  * every other tensor floating point and finite;
  * an ``octet`` header (a JSON object) whose ``unet_config`` sizes fit the tensors in the file and
    whose ``content_hash`` (written at save) matches the tensor data, so bit rot is caught.
Files without an Octet header (other tools' int8_tensorwise files) get every check that does not
need it.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Optional

import torch

from ..kernels.registry import ACT_MODES
from .api import OctetError

HASH_KEY = "content_hash"
HASH_ALGO = "sha256-tensors"
# An int8 grid: scale = absmax / 127. Weights or activations whose absmax is outside ~1e-8..1e6
# do not occur in a working model; values outside these ranges are corruption (1e30, 1e-30, int bits).
SCALE_RANGE = (1e-10, 1e3)          # weight_scale: |w| up to ~1e5, even after SmoothQuant folding
INPUT_SCALE_RANGE = (1e-10, 1e6)    # input_scale (activations can be large, e.g. SDXL's outliers)
SMOOTH_RANGE = (1e-8, 1e8)          # pre_quant_scale (SmoothQuant divisors)
ABSMAX_LIMIT = 1e10                 # calibration statistics: an activation above this is corruption
MAX_GROUPS = 1000                   # timestep groups
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# unet_config keys that count blocks/layers: each block holds at least one tensor in the file.
COUNT_KEYS = ("num_res_blocks", "transformer_depth", "transformer_depth_output", "transformer_depth_middle",
              "depth", "depth_single_blocks", "num_layers", "num_blocks", "layers")
# unet_config keys (by substring) that are not sizes: rope bases, periods, pixel sizes, epsilons, ratios
NOT_SIZES = ("theta", "period", "image_size", "patch_size", "seed", "eps", "scale", "ratio", "shift")
SIZE_LIMIT = 1 << 20                # no channel count or head count anywhere near a million


@contextlib.contextmanager
def about_file(path: str):
    """Prefix the file's name to an OctetError raised inside that does not name it already."""
    try:
        yield
    except OctetError as e:
        name = os.path.basename(path)
        if name in str(e):
            raise
        raise OctetError(f"'{name}': {e}") from e


# -- content hash --------------------------------------------------------------------------------
def _tensor_digest(t: torch.Tensor) -> bytes:
    h = hashlib.sha256()
    if t.numel():
        h.update(t.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return h.digest()


def content_hash(tensors: dict[str, torch.Tensor]) -> str:
    """A hash of every tensor's name, dtype, shape and bytes in sorted key order.

    SHA-256 (hardware-accelerated on current CPUs, 2-3x blake2b here) of each tensor's bytes, computed
    on a few threads (hashlib releases the GIL), then of the list (name, dtype, shape, digest): bit rot
    anywhere changes it; reading the file once is the cost (bench/filecheck.py)."""
    keys = sorted(tensors)
    workers = max(1, min(8, os.cpu_count() or 1, len(keys)))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        digests = list(pool.map(lambda k: _tensor_digest(tensors[k].detach()), keys))
    h = hashlib.sha256()
    for key, digest in zip(keys, digests):
        t = tensors[key]
        h.update(f"{key}|{str(t.dtype)}|{tuple(t.shape)}|".encode() + digest)
    return f"{HASH_ALGO}:{h.hexdigest()}"


def check_hash(fname: str, octet: dict, tensors: dict[str, torch.Tensor]) -> None:
    stored = octet.get(HASH_KEY)
    if stored is None:  # files from before the hash, or written by other tools: nothing to compare
        return
    if not isinstance(stored, str) or not stored.startswith(HASH_ALGO + ":"):
        raise OctetError(f"'{fname}': the Octet header's {HASH_KEY} is {stored!r}, not a {HASH_ALGO} hash. "
                         f"The header is damaged: save the model again.")
    if content_hash(tensors) != stored:
        raise OctetError(f"'{fname}': the tensor data does not match the content hash written when it was saved "
                         f"(bit rot or a modified file). Download or save it again.")


# -- saving ---------------------------------------------------------------------------------------
def check_finite_for_save(tensors: dict[str, torch.Tensor], what: str) -> None:
    """Refuse to write NaN/inf weights, scales or statistics: the file would only fail (or sample
    garbage) later, far from the cause."""
    for key in sorted(tensors):
        t = tensors[key]
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise OctetError(f"Not saving {what}: '{key}' holds {bad} NaN/inf value(s) of {t.numel()}. The model "
                             f"(or its calibration) is already broken upstream: check the source weights, LoRA "
                             f"strength or QAT settings, and quantize again.")


# -- checkpoints ----------------------------------------------------------------------------------
def parse_octet_header(fname: str, header: dict) -> dict:
    """The ``octet`` header record as a dict (empty when absent), with its field types checked."""
    if "octet" not in header:
        return {}
    try:
        octet = json.loads(header["octet"])
    except (json.JSONDecodeError, TypeError) as e:
        raise OctetError(f"'{fname}' has a damaged Octet header ({e}). Save it again.") from e
    if not isinstance(octet, dict):
        raise OctetError(f"'{fname}': the Octet header is a {type(octet).__name__}, expected a JSON object. "
                         f"The file is damaged: save it again.")
    version = octet.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise OctetError(f"'{fname}' has Octet format version {version!r}; expected a positive integer. "
                         f"The header is damaged: save it again.")
    arch = octet.get("architecture")
    if arch is not None:
        if not isinstance(arch, str) or not arch.isidentifier():
            raise OctetError(f"'{fname}': the Octet header's architecture is {arch!r}, not a model class name. "
                             f"The header is damaged: save it again.")
    if "unet_config" in octet and not isinstance(octet["unet_config"], dict):
        raise OctetError(f"'{fname}': the Octet header's unet_config is {_show(octet['unet_config'])}, expected "
                         f"a JSON object of sizes. The header is damaged: save the model again.")
    for key in ("mode", "model_type", "dtype", "policy"):
        if octet.get(key) is not None and not isinstance(octet[key], str):
            raise OctetError(f"'{fname}': the Octet header's '{key}' is {_show(octet[key])}, expected a string. "
                             f"The header is damaged: save it again.")
    if octet.get("timestep_groups") is not None:
        check_timestep_groups(fname, octet["timestep_groups"])
    return octet


def unet_config(fname: str, octet: dict) -> dict:
    """The header's architecture sizes, for rebuilding the model (checked by ``check_architecture``)."""
    config = octet.get("unet_config")
    if not isinstance(config, dict):
        raise OctetError(f"'{fname}': the Octet header names architecture '{octet.get('architecture')}' but has no "
                         f"unet_config (got {_show(config)}), so the model cannot be rebuilt. The header is "
                         f"damaged: save the model again.")
    return dict(config)


def guarded_build(fname: str, build):
    """Build the model the header describes; sizes were bounded by ``check_architecture``, but a forged
    combination (an empty channel_mult, heads that do not divide the width) still fails inside the
    host's constructors: that is the header's fault, said as such."""
    try:
        return build()
    except OctetError:
        raise
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, RuntimeError, ZeroDivisionError,
            AssertionError) as e:
        raise OctetError(f"'{fname}': the Octet header's architecture record does not build a model "
                         f"({type(e).__name__}: {e}). The header is damaged or forged: save the model again.") from e


def check_timestep_groups(fname: str, groups) -> int:
    """Number of groups of a ``GroupSelector.to_dict()`` record; finite ascending numeric boundaries."""
    b = groups.get("boundaries") if isinstance(groups, dict) else None
    if not isinstance(b, list) or len(b) >= MAX_GROUPS or \
            not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
                    for v in b) or any(b[i] >= b[i + 1] for i in range(len(b) - 1)):
        raise OctetError(f"'{fname}': timestep_groups is {_show(groups)}; expected {{'boundaries': [ascending "
                         f"non-negative sigmas]}} with fewer than {MAX_GROUPS} entries. The file is damaged: "
                         f"save (or calibrate) again.")
    return len(b) + 1


def parse_layer_specs(fname: str, tensors: dict[str, torch.Tensor], decode) -> dict[str, dict]:
    """Layer name -> comfy_quant JSON object, each checked to be an object of the expected shape."""
    layers = {}
    for key in sorted(k for k in tensors if k.endswith(".comfy_quant")):
        t = tensors[key]
        if t.dtype != torch.uint8 or t.dim() != 1:
            raise OctetError(f"'{fname}': '{key}' is a {t.dtype} tensor of shape {tuple(t.shape)}; comfy_quant "
                             f"entries are 1-D uint8 JSON bytes. The file is damaged: save it again.")
        spec = decode(t, key)
        name = key[: -len(".comfy_quant")]
        if not isinstance(spec, dict):
            raise OctetError(f"'{fname}': layer '{name}' has comfy_quant {_show(spec)}, expected a JSON object "
                             f"like {{\"format\": \"int8_tensorwise\"}}. The file is damaged: save it again.")
        extra = spec.get("octet")
        if extra is not None and not isinstance(extra, dict):
            raise OctetError(f"'{fname}': layer '{name}' has an Octet record {_show(extra)}, expected a JSON "
                             f"object. The file is damaged: save it again.")
        layers[name] = spec
    return layers


def check_layer(fname: str, name: str, spec: dict, tensors: dict, known_formats: Iterable[str],
                octet_format: str, groups: Optional[int], octet_file: bool = True) -> None:
    """Every tensor and field of one quantized layer; ``groups`` from the header (None if unknown);
    ``octet_file``: the file has an Octet header (so every layer it wrote carries its record)."""
    where = f"'{fname}', layer '{name}'"
    fmt = spec.get("format")
    if fmt not in tuple(known_formats):
        raise OctetError(f"{where} uses format {fmt!r}; Octet reads {list(known_formats)}. Load this file with "
                         f"ComfyUI's 'Load Diffusion Model' (the host runs its own formats) or the node pack that "
                         f"made it.")
    extra = spec.get("octet")
    extended = any(f"{name}.{k}" in tensors for k in ("input_scale", "pre_quant_scale"))
    if extra is None and (fmt == octet_format or (octet_file and extended)):
        raise OctetError(f"{where}: format '{fmt}' but no Octet record (kind, act) in its comfy_quant; "
                         f"Octet will not guess (a static layer would silently run dynamic). Save the model again.")
    extra = extra or {}
    w, s = tensors.get(f"{name}.weight"), tensors.get(f"{name}.weight_scale")
    if w is None or s is None:
        raise OctetError(f"{where} lacks its {'weight' if w is None else 'weight_scale'}: the file is incomplete. "
                         f"Download or save it again.")
    if w.dtype != torch.int8:
        raise OctetError(f"{where}: weight is {w.dtype}, expected int8. The file is damaged: save it again.")
    kind = extra.get("kind", "conv" if w.dim() == 4 else "linear")
    if kind not in ("linear", "conv") or w.dim() != (2 if kind == "linear" else 4) or 0 in w.shape:
        raise OctetError(f"{where}: kind {kind!r} with a weight of shape {tuple(w.shape)}; expected a 2-D linear "
                         f"or 4-D conv weight. The file is damaged: save it again.")
    act = extra.get("act", "dynamic")
    if act not in ACT_MODES:
        raise OctetError(f"{where}: act {act!r}; expected one of {list(ACT_MODES)}. The file is damaged.")
    if kind == "conv":
        _check_conv_geometry(where, extra)
    n, k = w.shape[0], w.shape[1]
    _check_scale(where, "weight_scale", s, (1, n), SCALE_RANGE)
    bias = tensors.get(f"{name}.bias")
    if bias is not None:
        if bias.dtype not in FLOAT_DTYPES or bias.numel() != n or bias.dim() != 1:
            raise OctetError(f"{where}: bias is {bias.dtype} of shape {tuple(bias.shape)}, expected {n} floats. "
                             f"The file is damaged: save it again.")
        _check_finite(where, "bias", bias)
    iscale = tensors.get(f"{name}.input_scale")
    if act == "static":
        if iscale is None:
            raise OctetError(f"{where} is static W8A8 but has no input_scale: the file is incomplete. Save it again "
                             f"(or re-quantize with the CALIBRATION).")
        if not extra.get("timestep_groups"):
            sizes, hint = (1,), " (timestep groups off)"
        elif groups is not None:
            sizes, hint = (groups,), f" (one per timestep group: the header defines {groups})"
        else:  # a file saved without the sampler's group bands: any count the layer itself selects among
            sizes, hint = tuple(range(1, MAX_GROUPS)), " (one per timestep group)"
        _check_scale(where, "input_scale", iscale, sizes, INPUT_SCALE_RANGE, hint=hint)
    elif iscale is not None and fmt == octet_format:
        raise OctetError(f"{where} has an input_scale but its record says act={act!r}; a static layer must say "
                         f"'static'. The file is damaged: save it again.")
    elif iscale is not None:  # another tool's int8_tensorwise layer: unused by dynamic math, but not garbage
        _check_scale(where, "input_scale", iscale, tuple(range(1, MAX_GROUPS)), INPUT_SCALE_RANGE)
    smooth = tensors.get(f"{name}.pre_quant_scale")
    if smooth is not None:
        if act == "none":
            raise OctetError(f"{where}: weight-only layer with a pre_quant_scale (SmoothQuant needs INT8 "
                             f"activations). The file is damaged: save it again.")
        _check_scale(where, "pre_quant_scale", smooth, (k,), SMOOTH_RANGE)
    elif extra.get("smoothed"):
        raise OctetError(f"{where} was saved with SmoothQuant but its pre_quant_scale is missing: the file is "
                         f"incomplete. Save it again.")


def check_plain_tensors(fname: str, tensors: dict, quant_keys: set) -> None:
    """Every tensor that is not a quantized layer's: floating point and finite."""
    for key in sorted(tensors):
        if key in quant_keys:
            continue
        t = tensors[key]
        if t.dtype not in FLOAT_DTYPES:
            raise OctetError(f"'{fname}': '{key}' is {t.dtype}; unquantized tensors are floating point. The file "
                             f"is damaged: save it again.")
        _check_finite(f"'{fname}'", f"'{key}'", t)


def check_layer_fits(fname: str, name: str, like, tensors: dict) -> None:
    """The model's layer (float or meta) has a bias exactly when the file gives one."""
    has_bias = getattr(like, "bias", None) is not None
    in_file = f"{name}.bias" in tensors
    if has_bias and not in_file:
        raise OctetError(f"'{fname}', layer '{name}': the model's layer has a bias but the file has no "
                         f"'{name}.bias'. The file is incomplete or damaged: save it again.")
    if in_file and like is not None and not has_bias and hasattr(like, "bias"):
        raise OctetError(f"'{fname}', layer '{name}': the file has a bias the model's layer does not have. It was "
                         f"made for another model type or configuration.")


def check_architecture(fname: str, unet_config: dict, shapes: dict[str, tuple]) -> None:
    """Sizes in the header's unet_config bounded by the tensors actually in the file: a header claiming
    8000 blocks over a file holding three is refused before any model is built."""
    n_tensors = len(shapes)
    max_dim = max((d for shape in shapes.values() for d in shape), default=0)
    bound = max(max_dim, n_tensors) * 4
    for key, value in unet_config.items():
        if not isinstance(key, str):
            raise OctetError(f"'{fname}': unet_config has a non-string key {key!r}. The header is damaged.")
        values = value if isinstance(value, list) else [value]
        if isinstance(value, dict):
            continue
        nums = []
        for v in values:
            if isinstance(v, bool) or v is None or isinstance(v, str):
                continue
            if isinstance(v, list):  # e.g. axes_dim inside a list: only plain numbers are sizes
                v = [x for x in v if isinstance(x, (int, float)) and not isinstance(x, bool)]
                nums.extend(v)
                continue
            if not isinstance(v, (int, float)) or not math.isfinite(v):
                raise OctetError(f"'{fname}': unet_config['{key}'] = {_show(value)} is not a number. The header is "
                                 f"damaged: save the model again.")
            nums.append(v)
        if any(part in key for part in NOT_SIZES):
            continue
        if any(v < -1 for v in nums):
            raise OctetError(f"'{fname}': unet_config['{key}'] = {_show(value)} is negative. The header is damaged: "
                             f"save the model again.")
        if key in COUNT_KEYS:
            total = sum(v for v in nums if v > 0)
            if total > n_tensors:
                raise OctetError(f"'{fname}': unet_config['{key}'] = {_show(value)} claims {total} blocks but the "
                                 f"file holds only {n_tensors} tensors. The header is forged or damaged; refusing "
                                 f"to build that model. Save the model again.")
        elif any(v > min(bound, SIZE_LIMIT) for v in nums):
            raise OctetError(f"'{fname}': unet_config['{key}'] = {_show(value)} is larger than any tensor in the "
                             f"file (largest dimension {max_dim}). The header is forged or damaged; refusing to "
                             f"build that model. Save the model again.")


# -- calibrations ---------------------------------------------------------------------------------
def check_calibration_header(fname: str, h) -> int:
    """Types of the calibration header's fields; returns the number of timestep groups."""
    if not isinstance(h, dict):
        raise OctetError(f"'{fname}': the calibration header is a {type(h).__name__}, expected a JSON object. "
                         f"The file is damaged: calibrate and save again.")
    layers = h.get("layers")
    if not isinstance(layers, dict) or not layers or \
            not all(isinstance(n, str) and kind in ("linear", "conv") for n, kind in layers.items()):
        raise OctetError(f"'{fname}': the calibration header's 'layers' is {_show(layers)}; expected a non-empty "
                         f"object of layer name -> 'linear'/'conv'. The file is damaged: calibrate and save again.")
    if not isinstance(h.get("fingerprint"), str):
        raise OctetError(f"'{fname}': the calibration header has no model fingerprint (got "
                         f"{_show(h.get('fingerprint'))}). The file is damaged: calibrate and save again.")
    for key in ("architecture",):
        if h.get(key) is not None and not isinstance(h[key], str):
            raise OctetError(f"'{fname}': the calibration header's '{key}' is {_show(h[key])}, expected a string.")
    for key in ("info", "histogram"):
        if h.get(key) is not None and not isinstance(h[key], dict):
            raise OctetError(f"'{fname}': the calibration header's '{key}' is {_show(h[key])}, expected an object. "
                             f"The file is damaged: calibrate and save again.")
    cap = h.get("sample_cap", 1)
    if not isinstance(cap, int) or isinstance(cap, bool) or not 0 < cap < 1 << 40:
        raise OctetError(f"'{fname}': sample_cap is {_show(cap)}, expected a positive integer.")
    return check_timestep_groups(fname, h.get("timestep_groups"))


def check_layer_stats(fname: str, name: str, t: dict[str, torch.Tensor]) -> None:
    """One layer's statistics: finite, non-negative, plausible and consistent with each other."""
    where = f"'{fname}', layer '{name}'"
    for key in ("absmax", "channel_absmax"):
        v = t[key]
        if v.dtype not in FLOAT_DTYPES:
            raise OctetError(f"{where}: {key} is {v.dtype}, expected floating point. The file is damaged.")
        if v.numel() and (not bool(torch.isfinite(v).all()) or float(v.min()) < 0 or float(v.max()) > ABSMAX_LIMIT):
            raise OctetError(f"{where}: {key} ranges {float(v.min()):.4g}..{float(v.max()):.4g}; activation ranges "
                             f"are finite, non-negative and below {ABSMAX_LIMIT:g}. The file is damaged: calibrate "
                             f"and save again.")
    for key in ("hist", "shape_hist", "count", "calls"):
        v = t[key]
        if v.dtype.is_floating_point or v.dtype == torch.bool or (v.numel() and int(v.min()) < 0):
            raise OctetError(f"{where}: {key} is {v.dtype} with minimum {v.min().item() if v.numel() else None}; "
                             f"counts are non-negative integers. The file is damaged: calibrate and save again.")
    calls, count = t["calls"], t["count"]
    absmax, chan = t["absmax"].float(), t["channel_absmax"].float()
    if calls.shape != count.shape or chan.dim() != 2 or chan.shape[0] != calls.numel() or \
            absmax.shape != calls.shape:
        return  # shapes are checked against the header by LayerStats.from_tensors, with its own message
    for g in range(calls.numel()):
        ran = int(calls[g]) > 0
        if ran != (int(count[g]) > 0):
            raise OctetError(f"{where}, timestep group {g}: {int(calls[g])} calls but {int(count[g])} samples. "
                             f"The statistics are inconsistent: calibrate and save again.")
        if ran and (float(absmax[g]) <= 0 or not math.isclose(float(absmax[g]), float(chan[g].max()),
                                                               rel_tol=1e-3, abs_tol=1e-12)):
            raise OctetError(f"{where}, timestep group {g}: absmax {float(absmax[g]):.4g} but the channels' largest "
                             f"is {float(chan[g].max()):.4g} (a layer that ran has a positive range, equal to its "
                             f"largest channel's). The file is damaged: calibrate and save again.")


def _check_conv_geometry(where: str, extra: dict) -> None:
    def pair(v, low):
        return isinstance(v, list) and len(v) == 2 and all(isinstance(x, int) and not isinstance(x, bool)
                                                           and low <= x <= 4096 for x in v)
    bad = [k for k, ok in (("stride", pair(extra.get("stride", [1, 1]), 1)),
                           ("dilation", pair(extra.get("dilation", [1, 1]), 1)),
                           ("padding", extra.get("padding", [0, 0]) in ("same", "valid")
                            or pair(extra.get("padding", [0, 0]), 0)),
                           ("groups", isinstance(extra.get("groups", 1), int) and 1 <= extra.get("groups", 1) <= 1 << 16))
           if not ok]
    if bad:
        raise OctetError(f"{where}: conv {bad[0]} is {_show(extra.get(bad[0]))}; expected two small integers "
                         f"(padding may also be 'same'/'valid'; groups one positive integer). The file is damaged.")


# -- helpers ----------------------------------------------------------------------------------------
def _check_finite(where: str, what: str, t: torch.Tensor) -> None:
    if t.numel() and not bool(torch.isfinite(t).all()):
        raise OctetError(f"{where}: {what} holds {int((~torch.isfinite(t)).sum())} NaN/inf value(s). The file is "
                         f"damaged: download or save it again.")


def _check_scale(where: str, what: str, s: torch.Tensor, sizes: tuple, bounds: tuple, hint: str = "") -> None:
    if s.dtype not in FLOAT_DTYPES:
        raise OctetError(f"{where}: {what} is stored as {s.dtype}; scales are floating point. The file is damaged: "
                         f"save it again.")
    if s.numel() not in sizes or (s.dim() > 1 and s.numel() != max(s.shape)):
        want = " or ".join(map(str, sizes)) if len(sizes) < 4 else f"{sizes[0]}..{sizes[-1]}"
        raise OctetError(f"{where}: {what} has shape {tuple(s.shape)}; expected {want} "
                         f"value(s){hint}. The file is damaged: save it again.")
    f = s.double()
    lo, hi = bounds
    if not bool(torch.isfinite(f).all()) or float(f.min()) < lo or float(f.max()) > hi:
        raise OctetError(f"{where}: {what} ranges {float(f.min()):.4g}..{float(f.max()):.4g}; valid scales are "
                         f"finite and within {lo:g}..{hi:g}. The file is damaged: save it again.")


def _show(value) -> str:
    text = json.dumps(value) if isinstance(value, (dict, list, str, int, float, bool, type(None))) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
