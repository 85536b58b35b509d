"""The compiled graph's counterpart of deferred.py's inputs and fusion.py's GELU epilogue: an Inductor
pre-grad pass that rewrites the float ops around ``octet::linear`` into one ``octet::linear_fused`` call.

Under torch.compile the deferred inputs do not run (a Pending tensor cannot be traced), so compiled Flux-dev
ran Inductor's cat + GELU pass before each single block's linear2 (102 us, 38 a step), its LayerNorm +
modulation passes before every qkv / linear1 / MLP fc1 (then the row quantizer read them again), and the double
blocks' MLP GELU as a pass of its own (68 us, 19 a step): H100 2026-12-06, GPU-bound at 105.4 ms a step through
CUDA Graph Step against compiled bf16's 137.0 (docs/BENCHMARKS.md). Eager Octet computes those in its
quantizers and GEMM epilogues. This pass gives the compiled graph the same kernels, at the level torch.compile
hands to Inductor (torch functions, before autograd and decompositions, where the host's ops are still
``torch.cat`` / ``F.gelu`` / ``F.layer_norm`` / ``torch.addcmul`` as its source calls them):

  octet::linear(cat((head, gelu_tanh(pre)), -1))            -> linear_fused(pre, head, input="gelu")
  octet::linear(addcmul(shift, layer_norm(x), mult))         -> linear_fused(x, mult, shift, input="norm")
  octet::linear(layer_norm(x))                               -> linear_fused(x, input="norm")
  gelu_tanh(octet::linear(x)) feeding another octet::linear  -> linear_fused(..., gelu_out=True)
  res += octet::linear(x) * gate  (or a fused one's output)  -> linear_fused(..., res, gate): the sum in the GEMM's
      epilogue, as a new tensor (only where res is nothing else's after the add: made by cat / add / an INT8 layer,
      read before by LayerNorms and INT8 layers alone)
  apply_rope(cat(rms_norm(q_i).to(v)), cat(rms_norm(k_i).to(v)), freqs)  -> octet::qk_norm_rope (Flux's QKNorm per
      stream, the double block's cat, ComfyUI 0.29's comfy_kitchen RoPE: eager's PendingQK kernel, where compiled
      Flux-dev ran comfy_kitchen's RoPE (3.6 ms a step) after Inductor's RMSNorm kernels (~3.8 ms))

Only where every intermediate has that one consumer (nothing else reads the float tensor), the LayerNorm has no
affine and normalizes the last dimension, the cat joins two tensors on the last one (the q/k streams': on the
tokens), and the addcmul has no ``value``. Only in graphs with INT8 layers: a bf16 model compiles as the host's.
At run time the layer's plan decides as in eager (QuantLinear.fused_call): a plan that does not take the input
computes the host's float ops first, so a rewrite can cost speed, never correctness.

Installed into ``torch._inductor.config.pre_grad_custom_pass`` when the first INT8 layer is made (importing
Inductor's config costs ~0.8 s, not paid by a pack that never quantizes), chained after any pass already there;
a ``CustomGraphPass`` with a uuid, so Inductor's FX graph cache keys on it. ``OCTET_COMPILE_FUSIONS=0`` turns the
rewrite off (read at each compile: bench/e2e.py compares both). The gated residual rewrite (``rewrite_residual``) is off
unless ``OCTET_COMPILE_RESIDUAL=1``: it gained nothing where it was built for (compiled Flux-dev through CUDA Graph Step
on an H100, 2026-12-06: 102.1 ms with it, 101.4 without; likely because the residual kernel has no persistent tile
loop, so its GEMMs lose what Inductor's adds cost).
"""
from __future__ import annotations

import hashlib
import logging
import operator
from typing import Optional

import torch
import torch.nn.functional as F

from ..kernels import switches
from ..kernels.registry import log_once

_LAYER_NORMS = (F.layer_norm, torch.layer_norm)
_GELUS = (F.gelu, torch._C._nn.gelu)
_installed = False


def enabled() -> bool:
    return switches.on("OCTET_COMPILE_FUSIONS")


def residuals_enabled() -> bool:
    """Whether ``apply`` puts gated residuals into the GEMM epilogue: only with OCTET_COMPILE_RESIDUAL=1 (see above)."""
    return switches.is_one("OCTET_COMPILE_RESIDUAL")


def _is(node, targets) -> bool:
    return node.op == "call_function" and node.target in targets


def _linear_targets() -> tuple:
    return (torch.ops.octet.linear.default, torch.ops.octet.linear)


def _layer_targets() -> tuple:
    """An INT8 layer's call in a graph: octet::linear, or the octet::linear_fused a rewrite made of one."""
    return _linear_targets() + (torch.ops.octet.linear_fused.default,)


def _arg(node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _value(node):
    """The fake tensor dynamo recorded for ``node`` (its shape and dtype), None if there is none."""
    meta = getattr(node, "meta", {})
    return meta.get("example_value", meta.get("val"))


def _only_user(node, user) -> bool:
    return isinstance(node, torch.fx.Node) and len(node.users) == 1 and user in node.users


def _is_gelu_tanh(node) -> bool:
    return _is(node, _GELUS) and len(node.args) == 1 and set(node.kwargs) == {"approximate"} \
        and node.kwargs["approximate"] == "tanh"


def _last_dim(node, dim) -> bool:
    value = _value(node)
    return isinstance(dim, int) and value is not None and dim in (-1, value.dim() - 1)


def _gelu_input(x, linear) -> Optional[dict]:
    """``cat((head, gelu_tanh(pre)), -1)`` read only by ``linear``: its parts, else None."""
    if not (_is(x, (torch.cat,)) and _only_user(x, linear)):
        return None
    tensors, dim = _arg(x, 0, "tensors"), _arg(x, 1, "dim", 0)
    if not isinstance(tensors, (list, tuple)) or len(tensors) != 2 or set(x.kwargs) - {"tensors", "dim"}:
        return None
    head, gelu = tensors
    if not (isinstance(head, torch.fx.Node) and _is_gelu_tanh(gelu) and _only_user(gelu, x) and _last_dim(x, dim)):
        return None
    return {"x": gelu.args[0], "head": head, "input": "gelu", "dead": [x, gelu]}


def _norm_input(x, linear) -> Optional[dict]:
    """``addcmul(shift, layer_norm(y), mult)`` or ``layer_norm(y)`` read only by ``linear``, else None."""
    mod = None
    if _is(x, (torch.addcmul,)) and _only_user(x, linear) and len(x.args) == 3 and not x.kwargs:
        mod, (shift, x, mult) = x, x.args
        if not (isinstance(shift, torch.fx.Node) and isinstance(mult, torch.fx.Node)):
            return None
    if not (_is(x, _LAYER_NORMS) and _only_user(x, mod if mod is not None else linear)):
        return None
    y, shape = _arg(x, 0, "input"), _arg(x, 1, "normalized_shape")
    weight, bias, eps = _arg(x, 2, "weight"), _arg(x, 3, "bias"), _arg(x, 4, "eps", 1e-5)
    value = _value(y) if isinstance(y, torch.fx.Node) else None
    if weight is not None or bias is not None or value is None or not isinstance(eps, float) \
            or tuple(shape) != (value.shape[-1],) or len(x.args) + len(x.kwargs) > 5:
        return None
    fused = {"x": y, "eps": eps, "input": "norm", "dead": [x]}
    if mod is not None:
        fused.update(mult=mult, shift=shift, dead=[mod, x])
    return fused


def _gelu_output(linear) -> Optional[torch.fx.Node]:
    """The ``gelu_tanh`` that alone reads ``linear``'s output and feeds another INT8 linear (an MLP's fc1 ->
    fc2, where fusion.py puts the GELU in fc1's epilogue), else None."""
    if len(linear.users) != 1:
        return None
    gelu = next(iter(linear.users))
    if not (_is_gelu_tanh(gelu) and len(gelu.users) == 1):
        return None
    return gelu if _is(next(iter(gelu.users)), _linear_targets()) else None


def _is_host_rope(node) -> bool:
    """ComfyUI 0.29's ``apply_rope`` (comfy.ldm.flux.math -> comfy_kitchen's op) as the graph calls it."""
    return node.op == "call_function" and "comfy_kitchen" in str(node.target) and "apply_rope" in str(node.target) \
        and len(node.args) == 3 and not node.kwargs


def _qk_segments(x, user) -> Optional[tuple]:
    """([(x_i, weight_i, eps_i, its dead nodes)], the cat's dead node) if ``x`` (read only by ``user``) is
    ``rms_norm(x_i, (D,), w_i, eps_i).to(v)`` for one stream, or their ``torch.cat(..., dim=2)`` for several
    (Flux's QKNorm, then the double block's cat of the text and image streams); else None."""
    parts, dead = [x], []
    if _is(x, (torch.cat,)) and _only_user(x, user) and not (set(x.kwargs) - {"dim"}):
        tensors, dim = _arg(x, 0, "tensors"), _arg(x, 1, "dim", 0)
        if not isinstance(tensors, (list, tuple)) or dim not in (2, -2):
            return None
        parts, dead, user = list(tensors), [x], x
    segments = []
    for part in parts:
        seg_dead = []
        if isinstance(part, torch.fx.Node) and part.op == "call_method" and part.target == "to" \
                and len(part.args) == 2 and not part.kwargs and _only_user(part, user):
            seg_dead, user_of_norm, part = [part], part, part.args[0]
        else:
            user_of_norm = user
        if not (_is(part, (torch.rms_norm, F.rms_norm)) and _only_user(part, user_of_norm)):
            return None
        y, shape = _arg(part, 0, "input"), _arg(part, 1, "normalized_shape")
        weight, eps = _arg(part, 2, "weight"), _arg(part, 3, "eps")
        value = _value(y) if isinstance(y, torch.fx.Node) else None
        if value is None or not isinstance(weight, torch.fx.Node) or len(part.args) + len(part.kwargs) > 4 \
                or tuple(shape) != (value.shape[-1],) or value.dim() != 4:
            return None
        eps = torch.finfo(value.dtype).eps if eps is None else eps      # torch's default, as eager's _rms_params
        segments.append((y, weight, float(eps), seg_dead + [part]))
    return segments, dead


def rewrite_qk(graph: torch.fx.Graph) -> int:
    """Flux's q/k preparation (QKNorm per stream, the streams' cat, the host's RoPE) -> octet::qk_norm_rope, as
    eager Octet's deferred QKNorm runs it (octet/deferred.py PendingQK); returns how many attention calls."""
    count = 0
    for rope in list(graph.nodes):
        if not _is_host_rope(rope):
            continue
        q, k, freqs = rope.args
        found_q = _qk_segments(q, rope) if isinstance(q, torch.fx.Node) else None
        found_k = _qk_segments(k, rope) if isinstance(k, torch.fx.Node) else None
        value = _value(q) if isinstance(q, torch.fx.Node) else None
        if found_q is None or found_k is None or value is None or len(found_q[0]) != len(found_k[0]):
            continue
        (qs, dead_q), (ks, dead_k) = found_q, found_k
        with graph.inserting_before(rope):
            node = graph.call_function(torch.ops.octet.qk_norm_rope.default, (
                [s[0] for s in qs], [s[0] for s in ks], [s[1] for s in qs], [s[1] for s in ks],
                [s[2] for s in qs], [s[2] for s in ks], freqs, value.dtype))
        node.meta.update(rope.meta)
        rope.replace_all_uses_with(node)
        graph.erase_node(rope)
        for dead in dead_q + dead_k + [n for s in qs + ks for n in s[3]]:
            graph.erase_node(dead)
        count += 1
    return count


def rewrite(graph: torch.fx.Graph) -> None:
    """Rewrite ``graph``'s octet::linear calls and their float neighbours (inputs, GELU output) as the module
    docstring lists."""
    targets = _linear_targets()
    fused_op = torch.ops.octet.linear_fused.default
    for linear in list(graph.nodes):
        if not _is(linear, targets) or linear.kwargs or len(linear.args) < 9:
            continue
        x = linear.args[0]
        found = (_gelu_input(x, linear) or _norm_input(x, linear)) if isinstance(x, torch.fx.Node) else None
        gelu = _gelu_output(linear)
        if found is None and gelu is None:
            continue
        found = found or {"x": x, "input": "plain", "dead": []}
        with graph.inserting_before(linear):
            node = graph.call_function(fused_op, (
                found["x"], found.get("head"), found.get("mult"), found.get("shift"), found.get("eps", 0.0),
                found["input"], gelu is not None, None, None, *linear.args[1:]))
        replaced = gelu if gelu is not None else linear
        node.meta.update(replaced.meta)
        replaced.replace_all_uses_with(node)
        for dead in ([gelu] if gelu is not None else []) + [linear] + found["dead"]:
            graph.erase_node(dead)


# What the gated residual's ``res`` may be made by: ops whose output is a tensor of its own (no view of another, no
# graph input), so writing the sum to a new tensor instead of into ``res`` changes nothing anyone else reads.
_FRESH = (torch.cat, operator.add, torch.add, F.linear, torch._C._nn.linear)


def _fresh(node) -> bool:
    return node.op == "call_function" and (node.target in _FRESH or node.target in _layer_targets())


def _residual_layer(layer, mul) -> bool:
    """Whether ``layer`` is an INT8 linear (or a fused one without its GELU epilogue or a residual) read only by
    ``mul``."""
    if not (isinstance(layer, torch.fx.Node) and _only_user(layer, mul) and not layer.kwargs):
        return False
    if _is(layer, _linear_targets()):
        return len(layer.args) >= 9
    return _is(layer, (torch.ops.octet.linear_fused.default,)) and layer.args[6] is False and layer.args[7] is None


def _residual_site(add, order) -> Optional[tuple]:
    """(res, gate, the layer's node, mul) if ``add`` is ``res += layer(...) * gate`` with ``layer`` an INT8 linear (or
    a fused one without its GELU epilogue) read only by the mul, the mul only by the add, the product of res's shape
    and dtype, and ``res`` a fresh tensor nothing reads after the add (so the sum may go to a new tensor); else None."""
    if not (add.op == "call_function" and add.target is operator.iadd and len(add.args) == 2 and not add.kwargs):
        return None
    res, mul = add.args
    if not (isinstance(res, torch.fx.Node) and _is(mul, (operator.mul, torch.mul)) and _only_user(mul, add)
            and len(mul.args) == 2 and not mul.kwargs):
        return None
    layer, gate = mul.args if _residual_layer(mul.args[0], mul) else reversed(mul.args)
    value, product = _value(res), _value(mul)
    if not (_residual_layer(layer, mul) and isinstance(gate, torch.fx.Node)) or value is None or product is None \
            or value.shape != product.shape or value.dtype != product.dtype or not _fresh(res):
        return None
    # What else may read res (before the add): ops that keep nothing aliasing it.
    readers = _LAYER_NORMS + _layer_targets()
    if any(user is not add and (order[user] > order[add] or not _is(user, readers)) for user in res.users):
        return None
    return res, gate, layer, mul


def rewrite_residual(graph: torch.fx.Graph) -> None:
    """``res += layer(...) * gate`` (Flux's residual after proj, the MLP's fc2 and linear2, ComfyUI's apply_mod
    without modulation_dims) -> one octet::linear_fused with ``res`` and ``gate``: the sum in the GEMM's epilogue
    where the plan takes it, rounded as the host's two ops (QuantLinear.fused_call), instead of Inductor's pass
    over the layer's output (1.7 ms of compiled Flux-dev's step on an H100, 2026-12-06). Off by default: the step
    was no faster with it (module docstring)."""
    fused_op = torch.ops.octet.linear_fused.default
    order = {n: i for i, n in enumerate(graph.nodes)}
    for add in list(graph.nodes):
        found = _residual_site(add, order)
        if found is None:
            continue
        res, gate, layer, mul = found
        args = layer.args if layer.target is fused_op else (layer.args[0], None, None, None, 0.0, "plain", False,
                                                            None, None, *layer.args[1:])
        with graph.inserting_before(add):
            node = graph.call_function(fused_op, (*args[:7], res, gate, *args[9:]))
        node.meta.update(add.meta)
        order[node] = order[add]        # a later residual's readers are compared by position: it stands there
        add.replace_all_uses_with(node)
        for dead in (add, mul, layer):
            graph.erase_node(dead)


def apply(graph: torch.fx.Graph) -> tuple[int, int]:
    """The rewrites (what the installed pass runs): (INT8 layers fused, attentions' q/k prepared in one op). The
    inputs first: a layer whose input was fused can then take its block's residual too."""
    rewrite(graph)
    attentions = rewrite_qk(graph)
    if residuals_enabled():
        rewrite_residual(graph)
    return sum(n.target is torch.ops.octet.linear_fused.default for n in graph.nodes), attentions


def _pass_class():
    from torch._inductor.custom_graph_pass import CustomGraphPass
    with open(__file__, "rb") as f:      # once: the pass's cache key changes with its code
        source = hashlib.sha256(f.read()).hexdigest()

    class OctetFusions(CustomGraphPass):
        """Inductor's pre-grad custom pass: the one before it (if any), then ``apply``."""

        def __init__(self, previous=None):
            self.previous = previous

        def __call__(self, graph: torch.fx.Graph) -> None:
            if self.previous is not None:
                self.previous(graph)
            if enabled() and any(_is(n, _linear_targets()) for n in graph.nodes):
                count, attentions = apply(graph)
                if count or attentions:
                    residual = " / gated residual" if residuals_enabled() else ""
                    log_once("compile-fusions", f"Octet: torch.compile runs {count} INT8 layer(s) with their "
                             f"LayerNorm / GELU{residual} inside the layer's kernels and {attentions} "
                             f"attention(s)' q/k norm + RoPE as one kernel, as eager Octet does "
                             f"(OCTET_COMPILE_FUSIONS=0 turns this off).",
                             logging.INFO)

        def uuid(self):
            # Asked at each compile for Inductor's cache key: this file's code and whether the switches are on.
            previous = getattr(self.previous, "uuid", None)
            return (source + ("on" if enabled() else "off") + str(residuals_enabled())
                    + ("" if previous is None else str(previous())))

        def __reduce__(self):
            # torch 2.11's FX graph cache pickles the whole Inductor config (this pass in it) to hash it; a class
            # made in a function does not pickle ("Can't pickle local object", logged at every compile, the
            # cache bypassed, bf16 models' compiles too): it pickles as its uuid instead.
            return _installed_pass, (self.uuid(),)
    return OctetFusions


def _installed_pass(uuid: str):
    """What a pickled pass loads as (Inductor pickles its config only to hash it): the pass installed here."""
    import torch._inductor.config as inductor_config
    return inductor_config.pre_grad_custom_pass


def install() -> None:
    """Put the pass into Inductor's config once per process (idempotent, cheap after the first call)."""
    global _installed
    if _installed:
        return
    _installed = True
    try:
        import torch._inductor.config as inductor_config
        cls = _pass_class()
    except Exception as e:  # noqa: BLE001 - a torch without Inductor: compiled graphs just keep the float ops
        log_once("compile-fusions-missing", f"Octet: torch.compile will not fuse LayerNorm / GELU into INT8 "
                 f"layers: Inductor's custom passes are unavailable ({type(e).__name__}: {e}).", logging.INFO)
        return
    current = inductor_config.pre_grad_custom_pass
    if type(current).__name__ == cls.__name__:
        return      # installed already (by this copy of the pack, or a second one ComfyUI's loader made)
    inductor_config.pre_grad_custom_pass = cls(current)
