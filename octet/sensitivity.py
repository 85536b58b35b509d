"""Sensitivity: quantize one layer (or block) at a time, measure how much the model output moves.

The caller hands us ``run``: a callable that evaluates the denoiser on a few *fixed* inputs
(latents at several noise levels, with their conditioning) and returns the outputs. We call it
once in float for the reference, then once per layer with only that layer swapped for its INT8
twin, and record the output MSE and PSNR against the reference. Layers are ranked most
sensitive first, and ``select`` keeps the worst ones in float until a budget is met:

- ``max_float_share``: at most this share of the quantizable parameters stays in float, counting the
  layers the base policy (preset) keeps in float too: a "10 %" budget means 10 % of the weights (issue 15:
  it once counted only the measured layers, and a preset's adaLN/embeddings made "10 %" 44 %);
- ``min_psnr``: keep layers until the whole quantized model is expected to stay above this PSNR.

Both budgets are filled greedily by *sensitivity per parameter* (output MSE a layer causes,
divided by its parameter count): a small layer that causes a lot of error is the cheapest to
keep. Errors of different layers are treated as additive (independent noise), which is what
the ``min_psnr`` estimate rests on; ``verify`` measures the real PSNR of the chosen mix and keeps
more layers if the estimate was optimistic.

The result is deterministic for deterministic ``run`` inputs: nothing here draws random numbers.
No ComfyUI import; the node adapter builds ``run`` from the host's sampler.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import torch
import torch.nn as nn

from .api import OctetError, quantizable_layers, quantize_, swapped
from .metrics import psnr_from_mse, tensor_psnr
from .config import QuantConfig
from .policy import KEEP, Only, Policy
from .report import decision_table

BUDGETS = ("max_float_share", "min_psnr")


def mse(ref: torch.Tensor, out: torch.Tensor) -> float:
    return float(torch.mean((out.detach().double() - ref.detach().double()) ** 2))


def peak(ref: torch.Tensor) -> float:
    """PSNR peak: the reference's value range (latents have no fixed 0..1 range like images)."""
    return float(ref.detach().max() - ref.detach().min())


def psnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    return tensor_psnr(ref.detach(), out.detach())   # peak = the reference's range, as peak() above


@dataclass
class Unit:
    """One measured unit: a layer, or a block of layers quantized together."""
    name: str
    layers: list[str]
    kind: str
    params: int
    mse: float = 0.0
    psnr: float = math.inf

    @property
    def per_param(self) -> float:
        return self.mse / max(self.params, 1)


@dataclass
class SensitivityResult:
    units: list[Unit]                 # most sensitive first
    peak: float                       # PSNR peak of the reference output
    mode: str
    skipped: dict[str, str] = field(default_factory=dict)  # layers not measured -> why (kept by base policy)
    skipped_params: int = 0           # parameters of those layers: float whatever the budget says
    model_params: int = 0             # every parameter of the model (norms, embeddings, buffers not included)

    @property
    def total_params(self) -> int:
        """Parameters of the measured units."""
        return sum(u.params for u in self.units)

    @property
    def quantizable_params(self) -> int:
        """Measured units plus the quantizable layers the base policy keeps in float: the budget's base."""
        return self.total_params + self.skipped_params

    def estimate_psnr(self, keep: Iterable[str]) -> float:
        """PSNR of quantizing every unit except ``keep``, assuming the errors add up."""
        keep = set(keep)
        return psnr_from_mse(sum(u.mse for u in self.units if u.name not in keep), self.peak)

    def to_text(self, keep: Iterable[str] = ()) -> str:
        keep = set(keep)
        rows = [(u.name, u.kind, u.params, u.psnr, "keep" if u.name in keep else self.mode,
                 f"rank {i}/{len(self.units)}, mse {u.mse:.3g}" + (f", {len(u.layers)} layers" if len(u.layers) > 1 else ""))
                for i, u in enumerate(self.units, 1)]
        return decision_table(rows)


def _params(module: nn.Module) -> int:
    return module.weight.numel() + (module.bias.numel() if getattr(module, "bias", None) is not None else 0)


def group_name(name: str, block_depth: Optional[int]) -> str:
    if not block_depth:
        return name
    return ".".join(name.split(".")[:block_depth])


def measure(model: nn.Module, run: Callable[[], torch.Tensor], config: QuantConfig, *,
            base: Optional[Policy] = None, calibration=None, block_depth: Optional[int] = None,
            progress: Optional[Callable[[int, int], None]] = None) -> SensitivityResult:
    """Rank the quantizable layers of ``model`` by the output error each causes alone.

    ``base``: a policy (e.g. a preset) applied first; layers it keeps in float are not measured
    (they stay in float anyway) and the others are measured in the mode it gives them.
    ``block_depth``: measure blocks (names cut to this many dotted parts) instead of layers.
    """
    candidates = [(n, m, k) for n, m, k in quantizable_layers(model) if k in config.kinds]
    if not candidates:
        raise OctetError("No layer to measure: the model has no Linear/Conv2d of the selected kinds. "
                         "Connect a float diffusion MODEL.")
    skipped, configs, units, skipped_params = {}, {}, {}, 0
    for name, module, kind in candidates:
        cfg, why = (config, "") if base is None else base.decide(name, module, config)
        if cfg is None:
            skipped[name] = why or "kept by base policy"
            skipped_params += _params(module)
            continue
        configs[name] = cfg
        key = group_name(name, block_depth)
        u = units.setdefault(key, Unit(key, [], kind, 0))
        u.layers.append(name)
        u.params += _params(module)
        if u.kind != kind:
            u.kind = "mixed"
    with torch.no_grad():
        ref = run().detach().float()
        pk = peak(ref)
        if not math.isfinite(pk) or pk <= 0:
            raise OctetError("The float model's output is constant or not finite; sensitivity needs a working "
                             "model (check the latent and conditioning inputs).")
        order = list(units.values())
        for i, unit in enumerate(order):
            alone = Only({n: configs[n] for n in unit.layers}, "not measured now")
            q = quantize_(model, config, policy=alone, calibration=calibration, inplace=False)
            with swapped(model, q.replacements):  # the caller's model comes back as it was, even on error
                out = run().detach().float()
            unit.mse = mse(ref, out)
            unit.psnr = psnr_from_mse(unit.mse, pk)
            if progress is not None:
                progress(i + 1, len(order))
    # Stable sort on (-mse, name): ties break by name, so the ranking is reproducible.
    ranked = sorted(order, key=lambda u: (-u.mse, u.name))
    return SensitivityResult(ranked, pk, config.mode, skipped, skipped_params,
                             sum(p.numel() for p in model.parameters()))


def select(result: SensitivityResult, budget: str, value: float) -> list[str]:
    """Units to keep in float, most cost-effective first."""
    if budget not in BUDGETS:
        raise OctetError(f"Unknown budget {budget!r}; choose one of {list(BUDGETS)}.")
    by_value = sorted(result.units, key=lambda u: (-u.per_param, u.name))
    keep: list[str] = []
    if budget == "max_float_share":
        if not 0.0 <= value <= 1.0:
            raise OctetError(f"max_float_share={value} must be a share in [0, 1] (e.g. 0.05 for 5% of parameters).")
        # The base policy's float layers spend the budget first; what is left goes to the measured units.
        allowance = value * result.quantizable_params - result.skipped_params
        used = 0
        for u in by_value:
            if u.mse <= 0:
                break
            if used + u.params <= allowance:  # knapsack-greedy: skip a unit too big, try smaller ones
                keep.append(u.name)
                used += u.params
        return keep
    target_mse = result.peak ** 2 / 10 ** (value / 10.0)
    remaining = sum(u.mse for u in result.units)
    for u in by_value:
        if remaining <= target_mse:
            break
        keep.append(u.name)
        remaining -= u.mse
    return keep


def to_policy(result: SensitivityResult, keep: Iterable[str], *, base: Optional[Policy] = None,
              name: str = "sensitivity", budget_note: str = "") -> Policy:
    """A Policy that keeps ``keep`` units in float (and whatever ``base`` keeps), with scores as notes."""
    keep = set(keep)
    units = {u.name: (i, u) for i, u in enumerate(result.units, 1)}
    overrides, notes, scores = {}, {}, {}
    for uname, (rank, u) in units.items():
        for layer in u.layers:
            scores[layer] = u.psnr
            notes[layer] = f"sensitivity rank {rank}/{len(units)}, {u.psnr:.1f} dB alone"
            if uname in keep:
                overrides[layer] = KEEP
                notes[layer] += f", kept to meet {budget_note or 'the budget'}"
    own = Policy(name=name, overrides=overrides, notes=notes, scores=scores)
    if base is None:
        return own
    merged = own.merged(base, name=f"{name}+{base.name}")
    return merged


def verify(model: nn.Module, run: Callable[[], torch.Tensor], config: QuantConfig, policy: Policy,
           calibration=None, reference: Optional[torch.Tensor] = None) -> float:
    """Real PSNR of the whole model quantized with ``policy`` (the model is restored afterwards)."""
    with torch.no_grad():
        ref = run().detach().float() if reference is None else reference
        q = quantize_(model, config, policy=policy, calibration=calibration, inplace=False)
        with swapped(model, q.replacements):
            out = run().detach().float()
    return psnr(ref, out)


def sensitivity_policy(model: nn.Module, run: Callable[[], torch.Tensor], config: QuantConfig, budget: str,
                       value: float, *, base: Optional[Policy] = None, calibration=None,
                       block_depth: Optional[int] = None, check: bool = True,
                       progress: Optional[Callable[[int, int], None]] = None) -> tuple[Policy, SensitivityResult, dict]:
    """Measure, select under the budget, and (for ``min_psnr``) check the real PSNR and keep more
    layers while it falls short. Returns (policy, result, summary)."""
    result = measure(model, run, config, base=base, calibration=calibration, block_depth=block_depth,
                     progress=progress)
    keep = select(result, budget, value)
    note = f"{budget}={value:g}"
    name = f"sensitivity:{config.mode}:{note}"
    policy = to_policy(result, keep, base=base, name=name, budget_note=note)
    summary = {"budget": budget, "value": value, "kept_units": len(keep), "units": len(result.units),
               "estimated_psnr": result.estimate_psnr(keep)}
    if check:
        real = verify(model, run, config, policy, calibration)
        if budget == "min_psnr":
            # Errors of different layers can add up faster than independent noise; keep the next
            # most cost-effective units until the real PSNR meets the target (or all are kept).
            order = [u.name for u in sorted(result.units, key=lambda u: (-u.per_param, u.name)) if u.name not in keep]
            step = 1
            while real < value and order:
                keep += order[:step]
                order = order[step:]
                step *= 2
                policy = to_policy(result, keep, base=base, name=name, budget_note=note)
                real = verify(model, run, config, policy, calibration)
            summary["kept_units"] = len(keep)
        summary["measured_psnr"] = real
    kept_params = sum(u.params for u in result.units if u.name in set(keep))
    float_params = kept_params + result.skipped_params
    summary["float_params"] = float_params
    summary["float_share"] = float_params / max(result.quantizable_params, 1)  # what the budget bounds
    summary["float_share_of_model"] = (float_params / result.model_params if result.model_params else None)
    if budget == "max_float_share" and result.skipped_params > value * result.quantizable_params:
        summary["over_budget"] = (f"the base policy alone keeps {100 * result.skipped_params / result.quantizable_params:.1f}"
                                  f"% of the quantizable parameters in float, over max_float_share={value:g}: "
                                  "choose base_preset 'none' or a larger budget")
    return policy, result, summary


def summary_text(result: SensitivityResult, summary: dict) -> str:
    of_model = summary.get("float_share_of_model")
    lines = [f"sensitivity ({result.mode}): {len(result.units)} units measured, "
             f"{len(result.skipped)} layers kept by the base policy and not measured",
             f"budget {summary['budget']}={summary['value']:g}: keep {summary['kept_units']} units in float; with "
             f"the base policy's layers {summary.get('float_params', 0):,} parameters stay float = "
             f"{100 * summary['float_share']:.2f}% of the quantizable parameters"
             + (f" ({100 * of_model:.2f}% of all model parameters)" if of_model is not None else ""),
             f"model-output PSNR (a proxy: denoiser outputs at the measured noise levels, not image PSNR): estimated "
             f"{summary['estimated_psnr']:.2f} dB" + (f", measured {summary['measured_psnr']:.2f} dB"
                                                     if "measured_psnr" in summary else "")]
    if "over_budget" in summary:
        lines.append("WARNING: " + summary["over_budget"])
    return "\n".join(lines)
