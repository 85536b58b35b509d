"""Quantization configs: what to do to a layer, as small frozen, validated records.

Configs go into checkpoint metadata and workflow widgets, so each one round-trips through
``to_dict`` / ``config_from_dict`` and rejects nonsense at construction time with a message
that says which value is wrong and what is allowed.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

LAYER_KINDS = ("linear", "conv")
# A config's user-facing mode -> the activation mode the kernels and files see: the one table.
ACT_OF_MODE = {"weight_only": "none", "dynamic": "dynamic", "static": "static"}
# kernels.registry.Backend's values (kept literal: configs are plain data, no kernel import here).
BACKENDS = ("auto", "triton", "bitsandbytes", "cpu", "float", "torch")
# Where INT8 does not pay at a layer's shapes (kernels' cost model): "speed" keeps a float copy of that
# layer's weight (VRAM, reported) so the call is a plain bf16 layer; "memory" never keeps one (fused
# W8A16 kernel reading int8 where it exists, else dequantize per call).
GOALS = ("speed", "memory")


def _check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {list(allowed)}.")


@dataclass(frozen=True)
class _BaseConfig:
    """Fields every INT8 mode shares."""
    kinds: tuple[str, ...] = LAYER_KINDS
    backend: str = "auto"
    goal: str = "speed"

    mode: ClassVar[str] = ""
    act: ClassVar[str] = ""  # activation mode the kernels see: none | dynamic | static

    def __post_init__(self):
        kinds = tuple(self.kinds)
        object.__setattr__(self, "kinds", kinds)
        if not kinds:
            raise ValueError("kinds is empty: quantize at least one of 'linear', 'conv'.")
        for k in kinds:
            _check_choice("kind", k, LAYER_KINDS)
        _check_choice("backend", self.backend, BACKENDS)
        _check_choice("goal", self.goal, GOALS)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["kinds"] = list(self.kinds)
        d["mode"] = self.mode
        return d


@dataclass(frozen=True)
class WeightOnlyConfig(_BaseConfig):
    """W8A16: int8 weights, float activations. Halves weight memory; no activation error."""
    mode: ClassVar[str] = "weight_only"
    act: ClassVar[str] = ACT_OF_MODE[mode]


def _check_alpha(alpha) -> None:
    if alpha is not None and not 0.0 <= alpha <= 1.0:
        raise ValueError(f"smooth_alpha={alpha} must be in [0, 1] (or None to disable).")


@dataclass(frozen=True)
class DynamicW8A8Config(_BaseConfig):
    """W8A8 with activation scales computed on the fly (per token for linear, per sample for conv).

    ``smooth_alpha``: optional SmoothQuant, as in the SmoothQuant paper's per-token setting. Per-token
    scales follow each row's range but one outlier *channel* still sets every row's scale; dividing
    the input channels by calibrated factors (folded into the weight) flattens them. Needs a
    CALIBRATION (the per-channel ranges); without one dynamic needs none."""
    smooth_alpha: float | None = None

    mode: ClassVar[str] = "dynamic"
    act: ClassVar[str] = ACT_OF_MODE[mode]

    def __post_init__(self):
        super().__post_init__()
        _check_alpha(self.smooth_alpha)


@dataclass(frozen=True)
class StaticW8A8Config(_BaseConfig):
    """W8A8 with activation scales fixed by calibration, optionally one set per timestep group,
    and optional SmoothQuant (alpha in [0, 1]; None disables smoothing)."""
    observer: str = "minmax"
    percentile: float = 99.99
    timestep_groups: bool = True
    smooth_alpha: float | None = None

    mode: ClassVar[str] = "static"
    act: ClassVar[str] = ACT_OF_MODE[mode]
    OBSERVERS: ClassVar[tuple[str, ...]] = ("minmax", "percentile", "mse")

    def __post_init__(self):
        super().__post_init__()
        _check_choice("observer", self.observer, self.OBSERVERS)
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile={self.percentile} must be in (50, 100].")
        _check_alpha(self.smooth_alpha)


# The static settings Octet recommends (measured in docs/QUALITY.md): the defaults of Quantize Model's static
# widgets and of scripts/convert.py. The class defaults above stay the plain ones (minmax, no SmoothQuant).
STATIC_RECIPE = StaticW8A8Config(observer="mse", percentile=99.99, timestep_groups=True, smooth_alpha=0.5)

CONFIG_TYPES: dict[str, type[_BaseConfig]] = {
    c.mode: c for c in (WeightOnlyConfig, DynamicW8A8Config, StaticW8A8Config)
}
MODES = tuple(CONFIG_TYPES)

QuantConfig = _BaseConfig


def config_from_dict(d: dict) -> _BaseConfig:
    d = dict(d)
    mode = d.pop("mode", None)
    if mode not in CONFIG_TYPES:
        raise ValueError(f"Unknown quantization mode {mode!r}; known modes: {list(CONFIG_TYPES)}.")
    cls = CONFIG_TYPES[mode]
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"Unknown fields {sorted(unknown)} for mode {mode!r}; expected {sorted(names)}.")
    if "kinds" in d:
        d["kinds"] = tuple(d["kinds"])
    return cls(**d)


def config_for_mode(mode: str, **kwargs) -> _BaseConfig:
    return config_from_dict({"mode": mode, **kwargs})
