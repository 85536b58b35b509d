"""MLP chains: fc1 -> GELU(tanh) -> fc2 with the GELU in fc1's INT8 GEMM epilogue.

Transformer MLPs (Flux's img_mlp/txt_mlp, Wan's ffn: ``nn.Sequential(Linear, GELU(tanh), Linear)``;
SD3's ``Mlp``: fc1/act/fc2) spend as much memory traffic on the hidden activation (4x the model
width) as on anything else: fc1 writes it in float, the GELU reads and writes it, fc2's
quantization reads it again. With a *static* scale for fc2's input no reduction over the hidden row
is needed, so fc1's epilogue applies the GELU and writes fc2's int8 codes directly
(``kernels.static_mlp``). Dynamic per-token scales cannot do this: the row's absmax spans every
program's columns. This is where static W8A8 is faster than dynamic, not in the per-layer kernel.

Where fc2 quantizes per token (or stays float), or fc1 is static and fc2 is not, fc1's epilogue still applies
the GELU and writes the activated hidden tensor (``QuantLinear.forward_gelu``): the host's separate GELU pass,
which reads and writes it (Wan 2.1 1.3B: 14,040 x 8,960 per block, 150 us of an H200's time, 4.7 ms a step),
is gone, and fc2 quantizes what fc1 wrote. The GELU is computed on fc1's fp32 output before its one rounding
(the host rounds fc1's output, then the GELU's), so the hidden tensor differs from the host's by that
rounding. A deferred input to fc1 (Wan's norm2 + modulation) is taken as fc1 alone takes it.

The container keeps its children: only its ``forward`` is replaced, by one that looks its layers
up at each call and falls back to the container's own forward whenever the chain does not apply
(a layer swapped for a float or fake-quant module, a LoRA weight function attached, a GELU with
hooks or its own forward). That keeps it correct under everything else that swaps layers (QAT, sensitivity, the
host's object patches), and it is installed the way the layers are: in place, or as a host
object patch on ``<container>.forward``.
"""
from __future__ import annotations

import types
from typing import Callable, Optional

import torch.nn as nn

from .. import kernels
from ..kernels import switches
from .float_fusions import is_wan_block
from .modules import QuantLinear


def enabled() -> bool:
    """OCTET_FUSED_MLP=0 runs chains as separate layers and the host's GELU (for comparisons; see bench/e2e.py).
    Read per call (a dict lookup), so a bench or test can switch it without reloading modules."""
    return switches.on("OCTET_FUSED_MLP")


def _is_gelu_tanh(m) -> bool:
    return isinstance(m, nn.GELU) and m.approximate == "tanh"


def _is_identity(m) -> bool:
    return isinstance(m, nn.Identity) or (isinstance(m, nn.Dropout) and (m.p == 0 or not m.training))


_MLP_CHILDREN = frozenset(("fc1", "act", "drop1", "norm", "fc2", "drop2"))


def chain_parts(module: nn.Module) -> Optional[tuple[nn.Module, nn.Module, nn.Module, str, str]]:
    """(fc1, act, fc2, fc1 name, fc2 name) if ``module`` is an MLP of the two supported shapes. Asked at every
    call of a chained MLP (its layers may be swapped since): read off ``_modules`` (an SD3 Mlp's check through
    hasattr / named_children took 21 us of Python, ~1 ms of a host-bound SD3.5 step's 47 MLP calls)."""
    mods = module._modules
    if isinstance(module, nn.Sequential):
        if len(mods) == 3:
            (n1, fc1), (_, act), (n2, fc2) = mods.items()
            if _is_gelu_tanh(act):
                return fc1, act, fc2, n1, n2
        return None
    fc1, act, fc2 = mods.get("fc1"), mods.get("act"), mods.get("fc2")
    if fc1 is None or fc2 is None or not _is_gelu_tanh(act) or not _MLP_CHILDREN.issuperset(mods):
        return None
    if not all(_is_identity(mods[a]) for a in ("drop1", "norm", "drop2") if a in mods and mods[a] is not None):
        return None
    return fc1, act, fc2, "fc1", "fc2"


def _chainable(layer) -> bool:
    return (type(layer) is QuantLinear and layer.act == "static" and layer.input_scale is not None
            and not layer.weight_function and not layer.bias_function)


def _gelu_epilogue(layer) -> bool:
    """Whether ``layer`` is an fc1 whose GEMM may apply the GELU (QuantLinear.forward_gelu decides per call)."""
    return type(layer) is QuantLinear and layer.act in ("dynamic", "static")


def _plain(module: nn.Module) -> bool:
    """No hook or per-instance forward that computing the GELU inside fc1 would skip."""
    return not (module._forward_hooks or module._forward_pre_hooks or "forward" in module.__dict__)


def _chain_forward(self, x, residual: bool = False):
    parts = chain_parts(self)
    if parts is not None and enabled():
        fc1, act, fc2, _, _ = parts
        if _chainable(fc1) and _chainable(fc2) and fc1.backend == fc2.backend:
            if kernels.ops.compiling():
                return kernels.ops.static_mlp(x, *_op_args(fc1, x), *_op_args(fc2, x), fc1.backend,
                                              fc1.op_owner, fc2.op_owner)
            if fc1.weight.device == x.device == fc2.weight.device:   # not under a lowvram per-call move
                run, s1, s2 = fc1.chain_plan(fc2, x)
                return run(x, s1, s2)
        if _gelu_epilogue(fc1) and _plain(act) and _plain(fc1):
            h = fc1.forward_gelu(x)
            if h is not None:
                if residual and type(fc2) is QuantLinear and _plain(fc2):
                    y = fc2.pending_output(h)
                    if y is not None:
                        return y
                return fc2(h)
    return type(self).forward(self, x)


def _chain_forward_residual(self, x):
    """A Wan block's FFN: as _chain_forward, fc2's output pending (octet/deferred.py PendingOutput) for the block's
    gated residual ``addcmul(x, ffn(...), e5)`` to take into fc2's GEMM epilogue (on an H200 at Wan 2.1 1.3B's
    14,040 tokens the addcmul pass is 67 us a block; not yet timed fused)."""
    return _chain_forward(self, x, True)


def _op_args(layer: QuantLinear, x):
    return (layer.weight, layer.current_weight_scale(), layer.bias, layer.pre_quant_scale,
            layer._static_scale(x.device))


def chain_forward(container: nn.Module, residual: bool = False):
    """The replacement ``forward`` for one MLP container (a bound method of it); ``residual``: a Wan block's FFN,
    whose output the block adds to its residual stream through a gate (residual_sites)."""
    return types.MethodType(_chain_forward_residual if residual else _chain_forward, container)


def is_chain_forward(forward) -> bool:
    return getattr(forward, "__func__", None) in (_chain_forward, _chain_forward_residual)


def residual_sites(model: nn.Module) -> set[str]:
    """Names of the MLP containers whose block adds their output through a gate: every Wan block's ``ffn``."""
    return {f"{name}.ffn" if name else "ffn" for name, m in model.named_modules()
            if is_wan_block(m) and "ffn" in m._modules}


def chain_forwards(model: nn.Module, replacements: dict[str, nn.Module]) -> dict[str, Callable]:
    """{name: chained forward} for every chain site of ``model`` (api.quantize_'s object patches)."""
    residual = residual_sites(model)
    return {name: chain_forward(model.get_submodule(name), name in residual)
            for name in chain_sites(model, replacements)}


def _sites(model: nn.Module, replacements: dict[str, nn.Module]) -> dict[str, bool]:
    """{name: static chain?} of the MLP containers in ``model`` whose fc1 and fc2 are (or will be, per
    ``replacements``) static W8A8 QuantLinears (True), or whose fc1 is a W8A8 QuantLinear (False: the GELU in
    its epilogue)."""
    sites = {}
    for name, module in model.named_modules():
        parts = chain_parts(module)
        if parts is None:
            continue
        prefix = f"{name}." if name else ""
        fc1 = replacements.get(prefix + parts[3], parts[0])
        fc2 = replacements.get(prefix + parts[4], parts[2])
        if (_chainable(fc1) and _chainable(fc2)) or _gelu_epilogue(fc1):
            sites[name] = _chainable(fc1) and _chainable(fc2)
    return sites


def chain_sites(model: nn.Module, replacements: dict[str, nn.Module]) -> list[str]:
    """Names of the MLP containers that get the chained forward (static chains and GELU epilogues)."""
    return list(_sites(model, replacements))


def static_chain_sites(model: nn.Module, replacements: dict[str, nn.Module]) -> list[str]:
    """Those of chain_sites whose two layers are static (fc2's codes written by fc1's epilogue)."""
    return [name for name, static in _sites(model, replacements).items() if static]


def install_chains(model: nn.Module) -> list[str]:
    """In place: give every chained MLP container of ``model`` (chain_sites) the chained forward."""
    found = chain_forwards(model, {})
    for name, forward in found.items():
        model.get_submodule(name).forward = forward
    return list(found)
