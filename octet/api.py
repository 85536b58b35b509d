"""quantize_: the one verb. Takes a torch module and a config (or a policy), returns a report.

With ``inplace=False`` the model is left untouched and the report carries the replacement
modules by name; ComfyUI integration uses that to install them as object patches on a cloned
ModelPatcher, so the source MODEL keeps sampling exactly as before.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Protocol

import torch
import torch.nn as nn

from . import deferred, float_fusions, fusion, lean_blocks, rope_table, shared_input, tables
from .config import DynamicW8A8Config, QuantConfig, StaticW8A8Config, WeightOnlyConfig
from .modules import QUANT_TYPES, QuantConv2d, QuantLinear
from .report import LayerRecord, QuantReport


class OctetError(ValueError):
    """Bad input with a message that says what is wrong and what to do."""


class DecidesLayers(Protocol):
    """What quantize_ needs of a policy (octet.policy.Policy is the one implementation; tests pass stubs)."""

    def decide(self, name: str, module: nn.Module, default: QuantConfig) -> tuple[Optional[QuantConfig], str]:
        """Config for this layer (None = keep in float) and the reason, for the report."""


@dataclass
class QuantResult(QuantReport):
    replacements: dict[str, nn.Module] = field(default_factory=dict)
    # name -> new forward: MLP containers whose fc1 applies the GELU in its INT8 epilogue, as one static INT8
    # chain where both layers are static (octet/fusion.py), and GELUs whose INT8 consumer applies them while
    # quantizing (octet/deferred.py).
    forwards: dict[str, Callable] = field(default_factory=dict)
    static_chains: list = field(default_factory=list)   # those chains whose fc2's codes fc1's epilogue writes
    # attribute path -> value: other object patches (octet/tables.py: SD3's int8 position table, memory goal)
    attributes: dict[str, object] = field(default_factory=dict)
    # [[layer names]]: linears that read one input and run as one GEMM (octet/shared_input.py: attention q/k/v)
    fused_groups: list = field(default_factory=list)
    tables_before: int = 0      # bytes of the tables ``attributes`` replaces, and of what replaces them
    tables_after: int = 0
    goal: str = "speed"

    @property
    def gelus(self) -> list[str]:
        """GELU modules whose consumer applies them (octet/deferred.py)."""
        return sorted(n for n, f in self.forwards.items() if isinstance(f, deferred.DeferredGeluForward))

    @property
    def norms(self) -> list[str]:
        """LayerNorms whose consumer applies them with their modulation (octet/deferred.py)."""
        return sorted(n for n, f in self.forwards.items() if isinstance(f, deferred.DeferredNormForward))

    @property
    def qk_norms(self) -> list[str]:
        """Flux QKNorms and SD3 ln_q / ln_k whose q/k preparation (RMSNorm, Flux's RoPE, the streams' cat) runs as
        one kernel (octet/deferred.py)."""
        return sorted(n for n, f in self.forwards.items() if isinstance(f, deferred.QKPrepForward))

    @property
    def float_fusions(self) -> list[str]:
        """GroupNorms (with their SiLU in a Sequential) and GEGLUs run by fused kernels (octet/float_fusions.py)."""
        return sorted(n for n, f in self.forwards.items() if isinstance(f, float_fusions.FORWARDS))

    @property
    def lean_blocks(self) -> list[str]:
        """SpatialTransformers whose blocks run without the host's per-call bookkeeping (octet/lean_blocks.py)."""
        return sorted(n for n, f in self.forwards.items() if isinstance(f, lean_blocks.FORWARDS))

    @property
    def chains(self) -> list[str]:
        """MLP containers whose fc1 applies the GELU in its INT8 epilogue (octet/fusion.py; ``static_chains``:
        those run as one static INT8 chain)."""
        return sorted(n for n, f in self.forwards.items() if fusion.is_chain_forward(f))

    def summary(self) -> str:
        gelus, norms = len(self.gelus), len(self.norms)
        chains = len(self.static_chains)
        epilogues = len(self.chains) - chains
        deferred_text = " and ".join(t for t in (f"{gelus} GELUs" if gelus else "", f"{norms} LayerNorms" if norms
                                                 else "") if t)
        qk = len(self.qk_norms)
        fused = [type(self.forwards[n]) for n in self.float_fusions]
        # Every GroupNorm has its own forward; a Sequential's adds its SiLU.
        gn, silu, geglu, norm = (fused.count(kind) for kind in (float_fusions.GroupNormForward,
                                                                float_fusions.GroupNormSiLUForward,
                                                                float_fusions.GegluForward,
                                                                float_fusions.NormModulateForward))
        return (super().summary() + (f"; {chains} MLPs run as static INT8 chains" if chains else "")
                + (f"; {epilogues} MLPs apply their GELU in fc1's INT8 epilogue" if epilogues else "")
                + (f"; {deferred_text} applied inside the next INT8 layer's quantization" if deferred_text else "")
                + (f"; {qk} QK norms fused into attention's q/k preparation" if qk else "")
                + (f"; {len(self.fused_groups)} attention q/k/v groups run as one GEMM each" if self.fused_groups
                   else "")
                + (f"; {gn} GroupNorms ({silu} with their SiLU) and {geglu} GEGLU gates fused where the Triton "
                   f"kernels run" if gn or geglu else "")
                + (f"; {norm} LayerNorms fused with their modulation where the Triton kernels run" if norm else "")
                + (f"; {len(self.lean_blocks)} transformer stacks run lean in eager steps" if self.lean_blocks
                   else "")
                + (f"; position table int8 ({self.tables_before / 2**20:.1f} MiB -> "
                   f"{self.tables_after / 2**20:.1f} MiB)" if self.attributes else ""))

    def to_text(self, limit: int | None = None) -> str:
        goal = ("goal=speed: a layer whose INT8 kernel is slower than bf16 at the shapes it runs at keeps a "
                "bf16 copy of its weight (chosen at its first call; VRAM cost in the log and plan_summary)"
                if self.goal == "speed" else
                "goal=memory: only int8 weights are kept; layers where INT8 loses read them through W8A16")
        lines = super().to_text(limit).splitlines()
        return "\n".join(lines[:-1] + [goal, lines[-1]])


# Float layer type -> (layer kind, the quantized module that replaces it): the one table of layer kinds.
LAYER_TYPES: dict[type, tuple[str, type]] = {nn.Linear: ("linear", QuantLinear), nn.Conv2d: ("conv", QuantConv2d)}
QUANT_CLASS = {kind: cls for kind, cls in LAYER_TYPES.values()}


def layer_kind(module: nn.Module) -> Optional[str]:
    if isinstance(module, QUANT_TYPES):
        return None
    for base, (kind, _) in LAYER_TYPES.items():
        if isinstance(module, base):
            return kind
    return None


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _unsupported(module: nn.Module) -> Optional[str]:
    w = getattr(module, "weight", None)
    if w is None:
        return "no weight"
    if w.numel() == 0:
        return "empty weight"
    if w.device.type == "meta":
        return "weight not materialised (meta)"
    if not w.dtype.is_floating_point:
        return f"weight already {w.dtype}"
    if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
        return f"padding_mode={module.padding_mode!r} not supported"
    return None


def quantizable_layers(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    return [(n, m, k) for n, m in model.named_modules() if (k := layer_kind(m)) is not None]


# Config type -> the function that turns one float layer into its quantized module (as torchao's
# quantize_ registers a transform per config type): a new mode is a new config class and one handler.
_HANDLERS: dict[type, Callable] = {}


def handler(*config_types: type):
    def register(fn):
        for t in config_types:
            _HANDLERS[t] = fn
        return fn
    return register


def smoothing_for(module, config, name, calibration) -> Optional[torch.Tensor]:
    """SmoothQuant divisors for ``name`` when ``config`` asks for them (they come from a calibration)."""
    if getattr(config, "smooth_alpha", None) is None:
        return None
    if calibration is None:
        raise OctetError(f"SmoothQuant (smooth_alpha={config.smooth_alpha}) needs a CALIBRATION for layer '{name}': "
                         f"its factors come from the recorded per-channel ranges. Run the Calibrate node on this "
                         f"model first, or turn SmoothQuant off.")
    return calibration.smoothing_factors(name, module.weight, config.smooth_alpha)


@handler(WeightOnlyConfig, DynamicW8A8Config)
def _quantize_plain(module, kind, config, name, calibration, weight):
    return QUANT_CLASS[kind].from_float(module, config.act, config.backend, weight=weight, goal=config.goal,
                                        smooth=smoothing_for(module, config, name, calibration))


@handler(StaticW8A8Config)
def _quantize_static(module, kind, config, name, calibration, weight):
    if calibration is None:
        raise OctetError(f"Mode '{config.mode}' needs a CALIBRATION for layer '{name}': run the Calibrate "
                         f"node on this model first, or choose mode 'dynamic' or 'weight_only'.")
    smooth = smoothing_for(module, config, name, calibration)
    q = QUANT_CLASS[kind].from_float(module, config.act, config.backend, smooth=smooth, weight=weight,
                                     goal=config.goal)
    q.set_static_scales(calibration.input_scales(name, config, smooth=smooth),
                        calibration.selector if config.timestep_groups else None)
    return q


def _build(module: nn.Module, kind: str, config: QuantConfig, name: str, calibration,
           weight: Optional[torch.Tensor] = None) -> nn.Module:
    build = _HANDLERS.get(type(config))
    if build is None:
        raise OctetError(f"No quantization handler for {type(config).__name__}; known: "
                         f"{sorted(t.__name__ for t in _HANDLERS)}.")
    return build(module, kind, config, name, calibration, weight).to(module.weight.device)


def quantize_(model: nn.Module, config: QuantConfig, *, policy: Optional[DecidesLayers] = None, calibration=None,
              inplace: bool = True, progress: Optional[Callable[[int, int], None]] = None,
              weight_overrides: Optional[dict[str, torch.Tensor]] = None) -> QuantResult:
    """Quantize every Linear/Conv2d of ``model`` that ``config`` (and ``policy``) select.

    ``weight_overrides`` maps layer names to the float weight to quantize instead of the module's
    own (e.g. with a LoRA merged in by the host).
    """
    candidates = quantizable_layers(model)
    if not candidates:
        kinds = sorted({type(m).__name__ for m in model.modules()})[:12]
        raise OctetError(f"This model has no Linear or Conv2d layer to quantize (module types: {kinds}). "
                         f"Connect a diffusion MODEL (UNet/DiT), not a VAE, CLIP or an already quantized model.")
    if calibration is not None:
        # Activation ranges belong to the weights they were recorded with; refuse any other model.
        calibration.check_model(model)
    result = QuantResult(goal=config.goal)
    for i, (name, module, kind) in enumerate(candidates):
        params = module.weight.numel() + (module.bias.numel() if module.bias is not None else 0)
        before = _nbytes(module.weight, module.bias)
        layer_config, reason = config, ""
        if policy is not None:
            layer_config, reason = policy.decide(name, module, config)
        if layer_config is None:
            skip = reason or "kept in float by policy"
        elif kind not in layer_config.kinds:
            skip = f"kind '{kind}' not selected"
        else:
            skip = _unsupported(module)
        if skip:
            result.layers.append(LayerRecord(name, kind, params, "skipped", skip, before, before))
        else:
            q = _build(module, kind, layer_config, name, calibration, (weight_overrides or {}).get(name))
            result.replacements[name] = q
            after = sum(_nbytes(t) for t in q.state_dict().values())
            result.layers.append(LayerRecord(name, kind, params, layer_config.mode, reason, before, after))
        if progress is not None:
            progress(i + 1, len(candidates))
    result.forwards.update(fusion.chain_forwards(model, result.replacements))
    result.static_chains = fusion.static_chain_sites(model, result.replacements)
    result.forwards.update(deferred.forwards(model, result.replacements))
    result.forwards.update(float_fusions.forwards(model))
    result.forwards.update(lean_blocks.forwards(model))
    result.forwards.update(rope_table.forwards(model))
    result.fused_groups = shared_input.attach(model, result.replacements)
    if config.goal == "memory":
        result.attributes = tables.patches(model)
        result.tables_before = sum(_nbytes(model.get_buffer(p)) for p in result.attributes
                                   if isinstance(result.attributes[p], torch.Tensor))
        result.tables_after = sum(tables.table_bytes(v) for v in result.attributes.values())
    if inplace:
        for name, q in result.replacements.items():
            model.set_submodule(name, q)
        for name, forward in result.forwards.items():
            model.get_submodule(name).forward = forward
        for path, value in result.attributes.items():
            owner, _, attr = path.rpartition(".")
            setattr(model.get_submodule(owner), attr, value)
    return result


@contextlib.contextmanager
def swapped(model: nn.Module, modules: dict[str, nn.Module]) -> Iterator[nn.Module]:
    """Put ``modules`` into ``model`` by name for the duration; the originals come back on exit."""
    originals = {name: model.get_submodule(name) for name in modules}
    try:
        for name, m in modules.items():
            model.set_submodule(name, m)
        yield model
    finally:
        for name, m in originals.items():
            model.set_submodule(name, m)
