"""Calibration: activation statistics of one model, per layer and timestep group, as a file.

A ``Calibration`` is what the Calibrate node outputs and Quantize Model (mode 'static') consumes
through ``quantize_``'s calibration protocol:

  * ``check_model(model)``         refuse statistics recorded on another model;
  * ``smoothing_factors(name, weight, alpha)``  SmoothQuant divisors from the per-channel absmax
                                   over *all* groups (one s per layer: it is folded into weights);
  * ``input_scales(name, config, smooth)``      static scales [G] (or [1] without timestep
                                   groups) of the input as the kernel sees it, i.e. x / s;
  * ``selector``                   the GroupSelector (sigma bands) shared by all static layers;
  * ``summary()``                  a JSON-able description stored with quantized models.

A calibration is statistics only: how they become static scales (observer, percentile, one
scale per timestep group or one for all, SmoothQuant alpha) is a ``StaticW8A8Config`` given at
quantize time, so one calibration serves every such setting without sampling again.

Files are safetensors: the statistics as tensors (``<layer>.<stat>``) and a JSON header
``octet_calibration`` with the architecture, layer names and kinds, the model fingerprint, the
timestep-group boundaries, and what was sampled (conditioning description, sampler settings,
date). Writes are atomic, like checkpoints.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch
import torch.nn as nn

from . import filecheck
from .api import OctetError, quantizable_layers
from .fingerprint import module_fingerprint
from .observers import BINS, BINS_PER_OCTAVE, MIN_LOG2, DEFAULT_SAMPLE_CAP, LayerStats, clip_value
from .safefile import save_atomic
from .smoothing import factors
from .timestep import GroupSelector
from ..kernels.torch_ref import scale_from_absmax

FORMAT_VERSION = 1
HEADER_KEY = "octet_calibration"
# Files written before the static settings moved to the quantization config carry them in
# info["settings"]; they are dropped on load (the config given at quantize time decides).
STALE_SETTINGS_KEY = "settings"

log = logging.getLogger("octet")


@dataclass
class Calibration:
    layers: dict[str, LayerStats]
    selector: GroupSelector
    fingerprint: str
    architecture: str = ""
    info: dict = field(default_factory=dict)   # what was sampled: conditioning, sampler settings, date, ...

    @property
    def groups(self) -> int:
        return self.selector.groups

    # -- the quantize_ protocol --------------------------------------------------------------
    def check_model(self, model: nn.Module, architecture: Optional[str] = None) -> None:
        """Raise OctetError unless ``model`` is the model these statistics were recorded on."""
        if architecture and self.architecture and architecture != self.architecture:
            raise OctetError(f"This CALIBRATION was recorded on a '{self.architecture}' model but the MODEL is "
                             f"'{architecture}'. Run Calibrate on this MODEL (or load its own calibration file).")
        fp = module_fingerprint(model)
        if fp != self.fingerprint:
            names = {n for n, _, _ in quantizable_layers(model)}
            missing = sorted(set(self.layers) - names)
            hint = (f"; its layer names differ too (e.g. {missing[:3]} are not in this model)" if missing else
                    "; the layers match by name, so it is likely a fine-tune, merge or other checkpoint of "
                    "the same architecture")
            raise OctetError(f"This CALIBRATION was recorded on another model (weights fingerprint "
                             f"{self.fingerprint}, this MODEL has {fp}){hint}. Activation ranges depend on the "
                             f"weights: run Calibrate on this MODEL, or load the calibration made for it.")

    def _stats(self, name: str) -> LayerStats:
        stats = self.layers.get(name)
        if stats is None:
            raise OctetError(f"The CALIBRATION has no statistics for layer '{name}'. Re-run Calibrate on this "
                             f"MODEL, or keep that layer in float with a policy.")
        if int(stats.calls.sum()) == 0:
            raise OctetError(f"Layer '{name}' never ran during calibration, so it has no activation range. "
                             f"Keep it in float with a policy (or use mode 'dynamic' for it).")
        return stats

    def smoothing_factors(self, name: str, weight: torch.Tensor, alpha: float) -> torch.Tensor:
        stats = self._stats(name)
        return factors(stats.channel_absmax.amax(0), weight, alpha)

    def input_scales(self, name: str, config, smooth: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Static activation scales of layer ``name``: one per group, or one if groups are off."""
        stats = self._stats(name)
        if not getattr(config, "timestep_groups", False):
            stats = stats.merged()
        empty = [g for g in range(stats.groups) if int(stats.calls[g]) == 0]
        if empty:
            raise OctetError(f"Layer '{name}' has no statistics for timestep group(s) {empty}: the sampler never "
                             f"evaluated the model at those noise levels. Re-run Calibrate with the same steps/"
                             f"scheduler you sample with, or turn timestep groups off.")
        clips = torch.tensor([clip_value(stats, g, config.observer, config.percentile, smooth)
                              for g in range(stats.groups)])
        return scale_from_absmax(clips)

    def summary(self) -> dict:
        return {"fingerprint": self.fingerprint, "architecture": self.architecture, "groups": self.groups,
                "timestep_groups": self.selector.to_dict(), "layers": len(self.layers),
                **{k: v for k, v in self.info.items() if k in ("created", "sampler", "conditioning", "name")}}

    # -- files -----------------------------------------------------------------------------------
    def header(self) -> dict:
        return {"format_version": FORMAT_VERSION, "architecture": self.architecture,
                "fingerprint": self.fingerprint, "timestep_groups": self.selector.to_dict(),
                "layers": {n: s.kind for n, s in self.layers.items()},
                "histogram": {"bins": BINS, "bins_per_octave": BINS_PER_OCTAVE, "min_log2": MIN_LOG2},
                "sample_cap": next(iter(self.layers.values())).sample_cap if self.layers else DEFAULT_SAMPLE_CAP,
                "info": self.info}

    def save(self, path: str) -> str:
        tensors = {f"{n}.{k}": v.contiguous() for n, s in self.layers.items() for k, v in s.tensors().items()}
        filecheck.check_finite_for_save(tensors, f"calibration '{os.path.basename(path)}'")
        save_atomic(tensors, path, {HEADER_KEY: json.dumps(self.header(), sort_keys=True)})
        return path

    @classmethod
    def load(cls, path: str) -> "Calibration":
        from safetensors import safe_open

        fname = os.path.basename(path)
        if not os.path.isfile(path):
            raise OctetError(f"No calibration file at '{path}'. Save one with Save Calibration first.")
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                header = (f.metadata() or {}).get(HEADER_KEY)
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises several error types for damaged files
            raise OctetError(f"'{fname}' is not a readable safetensors file ({type(e).__name__}: {e}). "
                             f"It is damaged: calibrate and save again.") from e
        if header is None:
            raise OctetError(f"'{fname}' is not an Octet calibration (no '{HEADER_KEY}' header). Quantized "
                             f"models go to Load Quantized; calibrations are made by Save Calibration.")
        try:
            h = json.loads(header)
        except json.JSONDecodeError as e:
            raise OctetError(f"'{fname}' has a damaged calibration header ({e}). Calibrate and save again.") from e
        if not isinstance(h, dict):
            filecheck.check_calibration_header(fname, h)  # raises: names what the header is
        if not isinstance(h.get("format_version"), int) or h["format_version"] > FORMAT_VERSION:
            raise OctetError(f"'{fname}' uses calibration format {h.get('format_version')!r}; this Octet reads up "
                             f"to {FORMAT_VERSION}. Update the Octet node pack.")
        filecheck.check_calibration_header(fname, h)
        hist = h.get("histogram", {})
        if (hist.get("bins"), hist.get("bins_per_octave"), hist.get("min_log2")) != (BINS, BINS_PER_OCTAVE, MIN_LOG2):
            raise OctetError(f"'{fname}' was made with another histogram layout ({hist}); re-run Calibrate.")
        layers = {}
        for name, kind in h["layers"].items():
            try:
                t = {k: tensors[f"{name}.{k}"] for k in ("absmax", "channel_absmax", "hist", "shape_hist",
                                                         "count", "calls")}
                filecheck.check_layer_stats(fname, name, t)
                layers[name] = LayerStats.from_tensors(kind, t, h.get("sample_cap", DEFAULT_SAMPLE_CAP))
            except OctetError:
                raise
            except (KeyError, ValueError) as e:
                raise OctetError(f"'{fname}': statistics of layer '{name}' are missing or malformed ({e}). "
                                 f"The file is damaged: calibrate and save again.") from e
        selector = GroupSelector.from_dict(h["timestep_groups"])
        for s in layers.values():
            if s.groups != selector.groups:
                raise OctetError(f"'{fname}': layers have {s.groups} groups but the header defines "
                                 f"{selector.groups}. The file is damaged: calibrate and save again.")
        info = dict(h.get("info") or {})
        stale = info.pop(STALE_SETTINGS_KEY, None)
        if stale:
            log.info("Octet: '%s' carries static settings from an older Octet (%s); they are ignored: observer, "
                     "percentile, timestep groups and SmoothQuant are now set on Quantize Model.", fname, str(stale)[:200])
        return cls(layers, selector, h["fingerprint"], h.get("architecture", ""), info)


# -- recording ---------------------------------------------------------------------------------
@contextlib.contextmanager
def record(model: nn.Module, selector: GroupSelector, *, sample_cap: int = DEFAULT_SAMPLE_CAP,
           architecture: str = "", info: Optional[dict] = None,
           on_call: Optional[Callable[[], None]] = None) -> Iterator[Calibration]:
    """Hook every quantizable layer of ``model`` while the block runs; yields the Calibration being filled.

    The caller drives the model and calls ``selector.select(sigma)`` before each forward; the hooks
    file each input under ``selector.index``. Hooks are removed on exit, also after an error, so
    the model is left exactly as it was.
    """
    layers = quantizable_layers(model)
    if not layers:
        raise OctetError("This model has no Linear or Conv2d layer to calibrate. Connect a float diffusion MODEL.")
    fingerprint = module_fingerprint(model)
    stats: dict[str, LayerStats] = {}
    handles = []
    try:
        for name, module, kind in layers:
            channels = module.in_features if kind == "linear" else module.in_channels
            stats[name] = s = LayerStats(kind, channels, selector.groups, sample_cap)
            handles.append(module.register_forward_pre_hook(_make_hook(s, selector)))
        info = dict(info or {})
        info.setdefault("created", datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
        yield Calibration(stats, selector, fingerprint, architecture, info)
    finally:
        for h in handles:
            h.remove()


def _make_hook(stats: LayerStats, selector: GroupSelector):
    def hook(module, args):
        stats.observe(args[0], selector.index)
    return hook


# -- what a calibration covers ------------------------------------------------------------------
# Below this many distinct prompts, Calibrate warns: static scales only cover the activation ranges the
# calibration prompts reach. Measured (docs/QUALITY_generalisation.md): on the reference models, scales
# calibrated on 3 of 10 classes score lower on the 7 classes they never saw than scales calibrated on all 10.
MIN_DISTINCT_PROMPTS = 8


def coverage_notes(positive_info: dict) -> list[str]:
    """Warnings about how narrow the calibration prompts were (``info['conditioning']['positive']``)."""
    n = positive_info.get("distinct")
    if n is None or n >= MIN_DISTINCT_PROMPTS:
        return []
    return [f"calibrated on {n} distinct prompt(s). Static scales only cover the activation ranges these prompts "
            f"reach; prompts unlike them get clipped or coarse scales (on Octet's reference models, calibrating on 3 "
            f"of 10 classes costs PSNR on the other 7: docs/QUALITY_generalisation.md). Use >= "
            f"{MIN_DISTINCT_PROMPTS} varied prompts (Calibration Prompts, batched), or dynamic mode."]


def sampler_mismatch(calibration_summary: dict | None, steps, cfg, sampler_name, scheduler) -> list[str]:
    """Where the sampling settings differ from those the calibration ran with (scales follow cfg and sigmas)."""
    cal = (calibration_summary or {}).get("sampler")
    if not cal:
        return []
    now = {"steps": int(steps), "cfg": float(cfg), "sampler": sampler_name, "scheduler": scheduler}
    diff = [f"{k} {cal[k]} -> {v}" for k, v in now.items() if k in cal and cal[k] != v]
    if not diff:
        return []
    return ["sampling with other settings than the calibration (" + ", ".join(diff) + "): cfg changes the "
            "activations the static scales were fitted to, steps/scheduler the sigmas the timestep groups were cut "
            "on. Calibrate again with these settings for the best static quality."]
