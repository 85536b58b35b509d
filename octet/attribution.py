"""Per-layer error attribution for static W8A8: which layers, at which noise levels, cost the most.

Sensitivity (sensitivity.py) ranks layers by one number. To find *why* static per-tensor scales fall
short of dynamic per-token ones, this module measures, for each quantizable layer alone:

  * the denoiser-output MSE it causes when made **static** (calibrated scale per timestep group) and
    when made **dynamic** (per-token scales), split by the timestep group of each evaluated state;
  * the activation statistics that explain the gap, read from the Calibration: range per group,
    per-channel spread (max / median channel absmax), the share of values the observer clips, and
    rows per call (1 per sample = a modulation / embedding input whose one row is the whole tensor,
    so a static scale must cover every timestep and condition at once, while dynamic fits each).

``auto_policy`` turns the measurement into a per-layer choice: static where it measures (nearly) as
well as dynamic, dynamic where static costs more than ``margin_db``. Errors are model-output
proxies at the evaluated states (not image PSNR): bench/attribution.py reports image PSNR of the result.

Pure torch; the caller hands in ``evaluate(i)`` (denoiser output at state i) and each state's sigma.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn as nn

from .api import quantizable_layers, quantize_, swapped
from .config import DynamicW8A8Config, StaticW8A8Config
from .metrics import db_gain, psnr_from_mse
from .observers import bin_edges, clip_value
from .policy import KEEP, Only, Policy


@dataclass
class LayerAttribution:
    name: str
    kind: str
    params: int
    static_mse: list[float]             # per timestep group: output MSE with only this layer static
    dynamic_mse: list[float]            # the same with only this layer dynamic (per-token)
    absmax: list[float]                 # calibration: largest |x| per group
    channel_spread: list[float]         # calibration: max / median of per-channel absmax, per group
    clipped_share: list[float]          # share of calibration values above the observer's clip, per group
    rows_per_call: float                # activation rows per forward call (tokens x batch; batch = modulation)

    @property
    def static_total(self) -> float:
        return sum(self.static_mse)

    @property
    def dynamic_total(self) -> float:
        return sum(self.dynamic_mse)

    @property
    def gap_db(self) -> float:
        """How much worse static is than dynamic on this layer (dB of output MSE; > 0 = static worse)."""
        if self.dynamic_total <= 0:
            return math.inf if self.static_total > 0 else 0.0
        return db_gain(max(self.static_total, 1e-30), self.dynamic_total)


@dataclass
class AttributionResult:
    layers: list[LayerAttribution]      # most costly (static) first
    groups: int
    states_per_group: list[int]
    peak: float                         # max |reference output|, for PSNR
    boundaries: list[float] = field(default_factory=list)

    def psnr(self, mse: float) -> float:
        return psnr_from_mse(mse, self.peak)

    def table(self, top: int = 12, chosen: Optional[dict[str, str]] = None) -> str:
        """Markdown table of the ``top`` layers by static error, with the statistics that explain it."""
        head = ("| layer | rows/call | static PSNR per group (group 0 = least noise -> most) | static PSNR | "
                "dynamic PSNR | static - dynamic | absmax per group | channel spread max/median | clipped share | " +
                ("choice |" if chosen else ""))
        lines = [head, "|" + "---|" * (head.count("|") - 1)]
        for a in self.layers[:top]:
            cells = [f"`{a.name}`", f"{a.rows_per_call:.0f}",
                     " / ".join(f"{self.psnr(m):.1f}" for m in a.static_mse), f"{self.psnr(a.static_total):.1f}",
                     f"{self.psnr(a.dynamic_total):.1f}", f"{a.gap_db:+.1f} dB",
                     " / ".join(f"{v:.3g}" for v in a.absmax),
                     " / ".join(f"{v:.1f}" for v in a.channel_spread),
                     " / ".join(f"{100 * v:.2g}%" for v in a.clipped_share)]
            if chosen:
                cells.append(chosen.get(a.name, "static"))
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)


def _clipped_share(hist: torch.Tensor, clip: float) -> float:
    """Share of histogrammed |x| at or above ``clip`` (bins whose lower edge is >= clip)."""
    total = float(hist.sum())
    if total <= 0:
        return 0.0
    lower = bin_edges()[:-1]
    return float(hist[lower >= clip].sum()) / total


def _params(m: nn.Module) -> int:
    return m.weight.numel() + (m.bias.numel() if getattr(m, "bias", None) is not None else 0)


@torch.no_grad()
def attribute(model: nn.Module, evaluate: Callable[[int], torch.Tensor], sigmas: list[float],
              config: StaticW8A8Config, calibration, *, layers: Optional[list[str]] = None,
              progress: Optional[Callable[[int, int], None]] = None) -> AttributionResult:
    """Measure every layer (or ``layers``) alone as static and as dynamic, per timestep group.

    ``evaluate(i)`` returns the denoiser output at state i (fixed inputs: same every call); ``sigmas[i]``
    is that state's noise level, which selects the static scale's timestep group.
    """
    selector = calibration.selector
    groups = selector.groups if config.timestep_groups else 1
    group_of = [selector.group_of(float(s)) if groups > 1 else 0 for s in sigmas]

    def outputs():
        outs = []
        for i, s in enumerate(sigmas):
            selector.select(float(s))
            outs.append(evaluate(i).detach().float())
        return outs

    ref = outputs()
    peak = max(float(r.abs().max()) for r in ref)
    # Like with like: the dynamic alternative keeps the static config's SmoothQuant (a policy override to
    # "dynamic" carries it over too, octet.policy._config_for).
    dynamic = DynamicW8A8Config(kinds=config.kinds, backend=config.backend, smooth_alpha=config.smooth_alpha)
    candidates = [(n, m, k) for n, m, k in quantizable_layers(model) if k in config.kinds
                  and (layers is None or n in layers) and n in calibration.layers
                  and int(calibration.layers[n].calls.sum()) > 0]
    rows = []
    for j, (name, module, kind) in enumerate(candidates):
        errs = {}
        for label, cfg in (("static", config), ("dynamic", dynamic)):
            q = quantize_(model, cfg, policy=Only({name: cfg}, "attribution: other layer"), calibration=calibration,
                          inplace=False)
            with swapped(model, q.replacements):  # the caller's model comes back as it was, even on error
                outs = outputs()
            per = [0.0] * groups
            for g, r, o in zip(group_of, ref, outs):
                per[g] += float((o - r).square().mean()) / max(group_of.count(g), 1)
            errs[label] = per
        stats = calibration.layers[name]
        spread, clipped, absmax = [], [], []
        view = stats if groups > 1 else stats.merged()
        for g in range(groups):
            ch = view.channel_absmax[g]
            absmax.append(float(view.absmax[g]))
            spread.append(float(ch.max() / ch.median().clamp_min(1e-12)))
            clip = clip_value(view, g, config.observer, config.percentile)
            clipped.append(_clipped_share(view.hist[g], clip))
        calls = max(int(stats.calls.sum()), 1)
        rows.append(LayerAttribution(name, kind, _params(module), errs["static"], errs["dynamic"], absmax, spread,
                                     clipped, float(stats.count.sum()) / calls / max(stats.channels, 1)))
        if progress is not None:
            progress(j + 1, len(candidates))
    rows.sort(key=lambda a: (-a.static_total, a.name))
    return AttributionResult(rows, groups, [group_of.count(g) for g in range(groups)], peak,
                             list(selector.boundaries))


def auto_policy(result: AttributionResult, margin_db: float = 1.0, base: Optional[Policy] = None,
                name: str = "auto", per_sample_dynamic: bool = True) -> tuple[Policy, dict[str, str]]:
    """Static where it measures within ``margin_db`` of dynamic (on output MSE, layer alone), else dynamic.

    ``per_sample_dynamic``: layers with the fewest rows per call (one row per sample: adaLN modulations,
    timestep / pooled-text embeddings) are dynamic whatever they measure. Their range is set by the timestep
    and the condition, so a static scale holds only for the prompts it was calibrated on (issue 15: on the
    reference MMDiT, calibrating on 3 of 10 classes cost 4.6 dB, 1.9 dB with these layers dynamic), and
    with M = batch they cost no speed either way.
    Returns (policy, {layer: "static" | "dynamic"}); ``base`` (e.g. a preset) still decides first.
    """
    chosen, notes = {}, {}
    fewest = min((a.rows_per_call for a in result.layers), default=0.0)
    for a in result.layers:
        if base is not None and base.action_for(a.name)[0] == KEEP:
            continue  # the base policy keeps it in float; an override here would win over that
        per_sample = per_sample_dynamic and a.rows_per_call < 2 * fewest
        choice = "dynamic" if per_sample or a.gap_db > margin_db else "static"
        chosen[a.name] = choice
        notes[a.name] = (f"auto: one row per sample (condition/timestep-dependent range) -> dynamic" if per_sample
                         else f"auto: static {a.gap_db:+.1f} dB vs dynamic (layer alone) -> {choice}")
    overrides = {n: c for n, c in chosen.items() if c == "dynamic"}
    own = Policy(name=name, overrides=overrides, notes=notes)
    return (own.merged(base, name=f"{name}+{base.name}") if base is not None else own), chosen
