"""Deferred inputs: the next INT8 layer computes a GELU(tanh) (and Flux's cat) or a LayerNorm and its
modulation while it quantizes, instead of float passes before it.

With dynamic per-token scales a layer's input cannot be quantized in the producing GEMM's epilogue
(the row's absmax spans every program's columns; fusion.py does that for static scales). What can go
is the float traffic before the quantization pass. In Flux's 38 single blocks linear2's input is
``torch.cat((attn, gelu(mlp)), 2)``: a GELU pass and a cat pass over 15360-wide rows before the
quantization pass reads it a third time. Every attention qkv and MLP fc1 of Flux and SD3 reads
``addcmul(shift, layer_norm(x), mult)``: a LayerNorm pass and a modulation pass in float, then the
quantization pass. Measured on an H200 at Flux's 4608 tokens (bench/deferred_kernels.py): 185.5 vs
304.8 us per single block, 39.2 vs 79.3 us per qkv/fc1 input. (A GELU straight into an MLP's fc2 is
not deferred: there the fused kernel measured slower than the float GELU plus the plain quantizer.)

So the GELU's (or LayerNorm's) forward (patched like the chain forwards: in place, or as a host object
patch) returns a ``Pending`` tensor: the output's shape and dtype, no storage, holding its input.
``torch.cat((attn, pending_gelu), -1)`` and ``torch.addcmul(shift, pending_norm, mult)`` stay pending.
The consumer (a QuantLinear whose plan offers ``gelu_input`` / ``norm_input``) hands them to one Triton
kernel (``triton_quant.GeluRowQuantizer`` / ``NormRowQuantizer``) that reads them in place and writes
the int8 row.

The host's block code is not copied or replaced, so host patches inside the block (0.29's
attn1_patch etc.) keep working. Anything else, or a consumer that cannot take it, computes the real
tensor first (``materialize``: exactly the float ops' numbers), logged once per function, so a host
change can cost speed but never correctness. A module defers only when its consumer already has a
plan for this signature that takes the input (so the first call at each shape, and every CPU,
weight-only, LoRA-under-lowvram or torch.compile call, runs as before).

Attention's query/key preparation is deferred the same way, for float and INT8 models alike: Flux's QKNorm
returns ``PendingQK`` (the RMSNorm of each head, not computed), the double block's ``torch.cat`` of the
text and image streams keeps it pending, and the host's ``apply_rope`` (wrapped once per process: the
wrapper only acts on pending inputs) computes norm + RoPE for q and k in one kernel
(``triton_rope.qk_norm_rope``) where the host runs ten to twelve passes, the RoPE in fp32.
"""
from __future__ import annotations

import importlib
import weakref
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import kernels
from ..kernels import switches
from ..kernels.backends import triton_support
from . import host_code


def enabled() -> bool:
    """OCTET_DEFERRED=0 turns it off (for comparisons: bench/e2e.py). Read per call."""
    return switches.on("OCTET_DEFERRED")


def _metadata_getters() -> frozenset:
    t = torch.Tensor
    return frozenset({t.shape.__get__, t.dtype.__get__, t.device.__get__, t.ndim.__get__, t.is_cuda.__get__,
                      t.requires_grad.__get__, t.layout.__get__, t.size, t.dim, t.numel, t.__len__})


class Pending(torch.Tensor):
    """A float op's output not computed yet. It has no storage: reading its metadata is free; every other
    torch function computes the value once (``materialize``) and from then on runs on that one tensor, so
    views of it and in-place writes to it (``t[:, a:b] *= m`` in a host's modulation code) act on the same
    memory, as they would on the real output, and a consumer that receives it afterwards gets what was
    written. Subclasses say what they stand for, which op keeps them pending (``absorb``), and how an
    INT8 plan computes them (``ENTRY``, ``feed``)."""

    _METADATA = _metadata_getters()
    ENTRY = ""                          # the plan method that takes this input (kernels/backends/triton_backend.py)
    FUSED = False                       # True: computing it is the fused path (nothing to log)
    computed: Optional[torch.Tensor]

    @staticmethod
    def _wrap(cls, shape, like: torch.Tensor, dtype: Optional[torch.dtype] = None):
        t = torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype or like.dtype, device=like.device)
        t.computed = None
        return t

    @property
    def source(self) -> torch.Tensor:
        """A real tensor with this one's rows (its plan signature)."""
        raise NotImplementedError

    def compute(self) -> torch.Tensor:
        raise NotImplementedError

    def feed(self, run, static, residual=None):
        """The consumer's output through its plan's ``ENTRY``, or None if the plan cannot take this input; with
        ``residual`` (res, gate; the plan's ``takes_residual`` checked) ``res + output * gate`` in its epilogue."""
        raise NotImplementedError

    def materialize(self) -> torch.Tensor:
        if self.computed is None:
            with torch._C.DisableTorchFunctionSubclass():
                self.computed = self.compute()
        return self.computed

    @classmethod
    def absorb(cls, func, args, kwargs):
        return None

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in Pending._METADATA:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        for kind in types:
            if issubclass(kind, Pending):
                kept = kind.absorb(func, args, kwargs)
                if kept is not None:
                    return kept
        if any(isinstance(a, Pending) and a.computed is None and not a.FUSED for a in _leaves(args, kwargs)):
            name = getattr(func, "__name__", str(func))
            kernels.registry.log_once(f"deferred:{name}",
                                      f"Octet: a deferred input was computed in float for {name} (not an op "
                                      f"Octet fuses); correct, but not fused.")
        args, kwargs = _materialized(args), _materialized(kwargs)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        # Reached only by paths that skip __torch_function__ (C++ callers): the same one real tensor.
        return func(*_materialized(args), **_materialized(kwargs or {}))

    def __repr__(self):
        return f"{type(self).__name__}(shape={tuple(self.shape)}, dtype={self.dtype})"


class PendingGelu(Pending):
    """``gelu_tanh(pre)``, or ``cat((head, gelu_tanh(pre)), -1)`` once Flux's cat has joined it."""

    ENTRY = "gelu_input"
    head: Optional[torch.Tensor]
    pre: torch.Tensor

    @staticmethod
    def __new__(cls, head: Optional[torch.Tensor], pre: torch.Tensor):
        shape = pre.shape if head is None else (*pre.shape[:-1], head.shape[-1] + pre.shape[-1])
        t = Pending._wrap(cls, shape, pre)
        t.head, t.pre = head, pre
        return t

    @property
    def source(self):
        return self.pre

    def compute(self):
        gelu = F.gelu(self.pre, approximate="tanh")
        return gelu if self.head is None else torch.cat((self.head, gelu), dim=-1)

    def feed(self, run, static, residual=None):
        return run.gelu_input(self.head, self.pre, static, residual)

    @classmethod
    def absorb(cls, func, args, kwargs):
        return _cat_head(*args, **kwargs) if func is torch.cat else None


class PendingNorm(Pending):
    """``layer_norm(x)`` without affine (eps), or ``addcmul(shift, layer_norm(x), mult)`` once the block's
    modulation has joined it (Flux's apply_mod, SD3's modulate). With a ``kernel`` (a float consumer's site,
    octet/float_fusions.py NormModulateForward) computing it is the fused path: one pass of
    kernels/backends/triton_layernorm.py where the host makes two."""

    ENTRY = "norm_input"
    x: torch.Tensor
    eps: float
    mult: Optional[torch.Tensor]
    shift: Optional[torch.Tensor]
    kernel: Optional[Callable]

    @staticmethod
    def __new__(cls, x: torch.Tensor, eps: float, mult: Optional[torch.Tensor] = None,
                shift: Optional[torch.Tensor] = None, kernel: Optional[Callable] = None):
        t = Pending._wrap(cls, x.shape, x)
        t.x, t.eps, t.mult, t.shift, t.kernel = x, eps, mult, shift, kernel
        t.FUSED = kernel is not None
        return t

    @property
    def source(self):
        return self.x

    def compute(self):
        if self.kernel is not None:
            y = self.kernel(self.x, self.eps, self.mult, self.shift)
            if y is not None:
                return y
        y = F.layer_norm(self.x, (self.x.shape[-1],), None, None, self.eps)
        return y if self.mult is None else torch.addcmul(self.shift, y, self.mult)

    def feed(self, run, static, residual=None):
        if not run.takes_norm(self.x, self.mult, self.shift):
            return None
        return run.norm_input(self.x, self.eps, self.mult, self.shift, static, residual)

    @classmethod
    def absorb(cls, func, args, kwargs):
        # torch.addcmul(shift, pending, mult): both hosts' modulation (with modulation_dims None).
        if func is not torch.addcmul or kwargs or len(args) != 3:
            return None
        shift, pending, mult = args
        if type(pending) is not PendingNorm or pending.mult is not None or pending.computed is not None:
            return None
        if type(shift) is not torch.Tensor or type(mult) is not torch.Tensor:
            return None
        x = pending.x
        per_batch = kernels.torch_ref.modulation_per_batch
        if not (per_batch(shift, x) and per_batch(mult, x)):
            return None
        if shift.dtype != x.dtype or mult.dtype != x.dtype or shift.device != x.device or mult.device != x.device:
            return None
        return PendingNorm(x, pending.eps, mult, shift, pending.kernel)


class PendingOutput(Pending):
    """An INT8 linear's output not computed yet (a Wan block's FFN output, octet/fusion.py): the block's gated
    residual ``addcmul(res, pending, gate)`` absorbs it and computes ``res + output * gate`` in the GEMM's epilogue
    (the block's new residual written once; the layer's output never written and read back). Anything else gets
    the layer's output, as its plan computes it (that is the layer's own path: nothing to log)."""

    ENTRY = ""                          # not an input any layer takes
    FUSED = True
    run: Callable
    x: torch.Tensor
    static: Optional[torch.Tensor]

    @staticmethod
    def __new__(cls, run: Callable, x: torch.Tensor, static: Optional[torch.Tensor], n: int):
        t = Pending._wrap(cls, (*x.shape[:-1], n), x)
        t.run, t.x, t.static = run, x, static
        return t

    @property
    def source(self):
        return self.x

    def compute(self):
        return self.run(self.x, self.static)

    def feed(self, run, static, residual=None):
        return None

    @classmethod
    def absorb(cls, func, args, kwargs):
        if func is not torch.addcmul or kwargs or len(args) != 3:
            return None
        res, pending, gate = args
        if type(pending) is not PendingOutput or pending.computed is not None \
                or type(res) is not torch.Tensor or type(gate) is not torch.Tensor \
                or _tracked(res, gate) or not pending.run.takes_residual(pending.x, res, gate):
            return None
        return pending.run.residual_output(pending.x, pending.static, res, gate)


def _leaves(args, kwargs):
    for a in (*args, *kwargs.values()):
        if isinstance(a, (list, tuple)):
            yield from a
        else:
            yield a


def _materialized(tree):
    if isinstance(tree, Pending):
        return tree.materialize()
    if isinstance(tree, (list, tuple)):
        return type(tree)(_materialized(t) for t in tree)
    if isinstance(tree, dict):
        return {k: _materialized(v) for k, v in tree.items()}
    return tree


def _cat_head(tensors, dim=0, **kwargs):
    """cat((head, pending), last dim) -> PendingGelu(head, pending.pre): Flux's single block."""
    if kwargs or not isinstance(tensors, (list, tuple)) or len(tensors) != 2:
        return None
    head, pending = tensors
    if type(head) is not torch.Tensor or type(pending) is not PendingGelu or pending.head is not None \
            or pending.computed is not None:
        return None
    pre = pending.pre
    if dim not in (-1, pre.dim() - 1) or head.dim() != pre.dim() or head.shape[:-1] != pre.shape[:-1] \
            or head.dtype != pre.dtype or head.device != pre.device:
        return None
    return PendingGelu(head, pre)


def _resolve(container: nn.Module, path: str):
    m = container
    for part in path.split("."):
        m = m._modules.get(part) if m is not None else None
    return m


class ModuleForward:
    """A replacement ``forward`` of one module, set as that module's own ``forward`` attribute (here and in
    octet/float_fusions.py). It holds the module weakly: a strong reference back would be a cycle that keeps
    a dropped model's GPU memory until the garbage collector happens to run."""

    def __init__(self, module: nn.Module):
        self._module = weakref.ref(module)

    @property
    def module(self) -> nn.Module:
        return self._module()


def module_forwards(model: nn.Module, sites: dict[str, type]) -> dict[str, ModuleForward]:
    """{name: kind(module)}: a replacement forward for each site (kinds that take only their module)."""
    return {name: kind(model.get_submodule(name)) for name, kind in sites.items()}


def set_forwards(model: nn.Module, found: dict[str, ModuleForward]) -> list[str]:
    """Each replacement forward set on its module, in place (a loaded checkpoint, or a float model); the names."""
    for name, forward in found.items():
        model.get_submodule(name).forward = forward
    return sorted(found)


class DeferredForward(ModuleForward):
    """The replacement ``forward`` of one module (a GELU, a LayerNorm) whose output feeds the INT8 layer(s)
    at ``consumers`` (paths under ``container``). They are looked up at each call, so this follows
    whatever layer is in place (a host object patch, a float layer restored by QAT or sensitivity), except
    that their "no" for a signature is kept until a plan is made anywhere (a layer put in place makes one
    at its first call)."""

    kind: type = Pending

    def __init__(self, module: nn.Module, container: nn.Module, consumers: tuple[str, ...]):
        super().__init__(module)
        self._container, self.consumers = weakref.ref(container), tuple(consumers)   # weak, as the module
        self._declined = None

    def _ready(self, x: torch.Tensor) -> bool:
        container = self._container()
        if container is None:
            return False
        for path in self.consumers:
            takes = getattr(_resolve(container, path), "takes_deferred", None)
            if takes is not None and takes(x, self.kind.ENTRY):
                return True
        return False

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if type(x) is torch.Tensor and not kernels.ops.compiling() and enabled():
            # A consumer declines for a signature until some plan changes (the eager plans of SD3.5's GEMMs
            # decline every step: kernels/backends/triton_backend.py deferral_pays); asking again costs more
            # host time than the LayerNorm itself. Remembering a "no" is always safe: it runs the float op.
            key = (x.shape, x.dtype, x.device, kernels.dispatch.planning_for_graph(), kernels.dispatch.plans_made())
            if key != self._declined:
                if self._ready(x):
                    return self.pending(x)
                self._declined = key
        return self.original(x)


class DeferredGeluForward(DeferredForward):
    kind = PendingGelu

    def pending(self, x):
        return PendingGelu(None, x)

    def original(self, x):
        return nn.GELU.forward(self.module, x)


class DeferredNormForward(DeferredForward):
    kind = PendingNorm

    def pending(self, x):
        return PendingNorm(x, self.module.eps)

    def original(self, x):
        return type(self.module).forward(self.module, x)


def _cat_args(args, kwargs) -> Optional[tuple[tuple, int]]:
    """(tensors, dim) of a ``torch.cat`` call joining two or more tensors, else None."""
    tensors = args[0] if args else kwargs.get("tensors")
    dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
    if len(args) > 2 or set(kwargs) - {"tensors", "dim"} or not isinstance(tensors, (list, tuple)) \
            or len(tensors) < 2:
        return None
    return tuple(tensors), dim


def _host_rms_norms(segments: tuple, dtype: torch.dtype, dim: int) -> torch.Tensor:
    """The host's ops for QK-norm segments: rms_norm with the weight cast to x's dtype, the result in
    ``dtype``, the segments' cat along ``dim``."""
    parts = [F.rms_norm(x, (x.shape[-1],), w.to(x.dtype), eps).to(dtype) for x, w, eps in segments]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


_kernels_run_on = triton_support.runs_on   # a module global: benches stand it in (bench/fused_ops_host.py)


def kernel_input(x) -> bool:
    """Whether ``x`` may go to a Triton kernel that stands in for host ops (here and octet/float_fusions.py): a
    plain tensor (not a pending one), outside torch.compile, on a device where the kernels run."""
    return type(x) is torch.Tensor and not kernels.ops.compiling() and _kernels_run_on(x)


def _for_graph(x: torch.Tensor) -> bool:
    """Whether this call on ``x`` is planned for a CUDA graph (CUDA Graph Step's warm-up and capture calls: the
    kernels' dispatch.graph_plans) or is being captured. A CUDA ``x`` stands for ``torch.cuda.is_available()``,
    which reads the environment and asks NVML on every call (~1.5 us, per QK norm of an eager SD3 step)."""
    return kernels.dispatch.planning_for_graph() or (x.is_cuda and torch.cuda.is_current_stream_capturing())


def _tracked(*tensors) -> bool:
    """Whether autograd would record an op on these: the q/k kernels have no backward (QAT, training)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class PendingQK(Pending):
    """Flux's QKNorm output for q or k: ``rms_norm(x_i, weight_i, eps_i)`` over the head dim of [B, H, L_i, D]
    views of the qkv projection, in ``dtype``, one segment per stream once the double block's
    ``torch.cat(..., dim=2)`` has joined the text and image streams (each with its own norm weights). The
    host's ``apply_rope`` (wrapped by ``_rope_wrapper``) turns a q/k pair into real tensors in one kernel."""

    segments: tuple    # ((x, weight, eps), ...) along the tokens
    # Its shape, dtype and device as plain attributes: reading a tensor subclass's own goes through
    # __torch_function__, and an eager Flux step reads them some thousand times per step (host time).
    meta: tuple        # (shape, dtype, device)

    @staticmethod
    def __new__(cls, segments: tuple, dtype: torch.dtype):
        x = segments[0][0]
        shape = (*x.shape[:2], sum(s[0].shape[2] for s in segments), x.shape[3])
        t = Pending._wrap(cls, shape, x, dtype)
        t.segments, t.meta = segments, (shape, dtype, x.device)
        return t

    @property
    def source(self):
        return self.segments[0][0]

    def compute(self):
        # The host's ops: QKNorm (then .to(v)), the double block's cat along the tokens.
        return _host_rms_norms(self.segments, self.meta[1], 2)

    @classmethod
    def absorb(cls, func, args, kwargs):
        cat = _cat_args(args, kwargs) if func is torch.cat else None
        if cat is None:
            return None
        tensors, dim = cat
        if not all(type(t) is PendingQK and t.computed is None for t in tensors):
            return None
        (shape, dtype, device) = tensors[0].meta
        if dim not in (2, -2) or any(m[1] != dtype or m[2] != device or m[0][:2] != shape[:2] or m[0][3] != shape[3]
                                     for m in (t.meta for t in tensors)):
            return None
        return PendingQK(tuple(s for t in tensors for s in t.segments), dtype)

    def rope_with(self, k: "PendingQK", freqs) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """(q, k) after the RoPE, this being q, from one kernel per segment; None if the kernel cannot take
        them (the host's apply_rope then runs on the computed tensors)."""
        from ..kernels.backends import triton_rope
        (shape, dtype, _) = self.meta
        if self.computed is not None or k.computed is not None or k.meta != self.meta \
                or not isinstance(freqs, torch.Tensor) or freqs.dim() != 6 or freqs.shape[2] != shape[2] \
                or len(self.segments) != len(k.segments):
            return None
        segments = []
        for (q, wq, eq), (kx, wk, ek) in zip(self.segments, k.segments):
            if q.shape != kx.shape or q.dtype != kx.dtype or not (triton_rope.takes(q, wq, freqs)
                                                               and triton_rope.takes(kx, wk, freqs)):
                return None
            segments.append((q, kx, wq, wk, eq, ek))
        return triton_rope.qk_norm_rope(segments, freqs, dtype)


class PendingRMS(Pending):
    """SD3's ln_q / ln_k (RMSNorm over the head dim, mmdit.RMSNorm) of [B, L, H, D] views of a qkv output, not
    computed. pre_attention's ``reshape(B, L, -1)`` and MMDiT's ``torch.cat((context_q, x_q), dim=1)`` keep it
    pending; the first other op (attention's view into heads) computes every segment with one kernel launch
    each (``triton_rope.rms_norm_heads``) straight into the concatenated layout: the host's norm kernels on
    64-wide rows and the cat pass are gone (SD3.5-medium on an H200: 6.2 ms of norms, 1.7 ms of cats in a 35 ms
    step)."""

    FUSED = True
    segments: tuple    # ((x, weight, eps), ...) along the tokens
    flat: bool         # reshaped to [B, L, H * D]
    meta: tuple        # (shape, dtype, device) as plain attributes (see PendingQK)

    @staticmethod
    def __new__(cls, segments: tuple, dtype: torch.dtype, flat: bool = False):
        x = segments[0][0]
        b, _, h, d = x.shape
        length = sum(s[0].shape[1] for s in segments)
        shape = (b, length, h * d) if flat else (b, length, h, d)
        t = Pending._wrap(cls, shape, x, dtype)
        t.segments, t.flat, t.meta = segments, flat, (shape, dtype, x.device)
        return t

    @property
    def source(self):
        return self.segments[0][0]

    def compute(self):
        from ..kernels.backends import triton_rope
        x0 = self.segments[0][0]
        if _kernels_run_on(x0) and all(triton_rope.takes_rows(x, w) and x.dtype == x0.dtype
                                       for x, w, _ in self.segments):
            out = triton_rope.rms_norm_heads(self.segments, self.meta[1])
        else:
            out = _host_rms_norms(self.segments, self.meta[1], 1)
        return out.reshape(self.meta[0])

    @classmethod
    def absorb(cls, func, args, kwargs):
        if func is torch.Tensor.reshape and not kwargs and args and type(args[0]) is PendingRMS:
            t = args[0]
            shape = tuple(args[1]) if len(args) == 2 and isinstance(args[1], (tuple, list, torch.Size)) else args[1:]
            if t.flat or t.computed is not None:
                return None
            b, length, h, d = t.meta[0]
            if len(shape) != 3 or tuple(shape[:2]) != (b, length) or shape[2] not in (-1, h * d):
                return None
            return PendingRMS(t.segments, t.meta[1], True)
        cat = _cat_args(args, kwargs) if func is torch.cat else None
        if cat is not None:
            tensors, dim = cat
            if dim not in (1, -2):
                return None
            if not all(type(t) is PendingRMS and t.flat and t.computed is None for t in tensors):
                return None
            (shape, dtype, device), head = tensors[0].meta, tensors[0].segments[0][0].shape[2:]
            if not all(t.meta[1] == dtype and t.meta[2] == device and t.meta[0][0] == shape[0]
                       and t.meta[0][2] == shape[2] and t.segments[0][0].shape[2:] == head for t in tensors):
                return None
            return PendingRMS(tuple(s for t in tensors for s in t.segments), dtype, True)
        return None


def _rope_wrapper(original):
    def apply_rope(xq, xk, freqs_cis):
        if type(xq) is PendingQK and type(xk) is PendingQK:
            out = xq.rope_with(xk, freqs_cis)
            if out is not None:
                return out
        return original(xq, xk, freqs_cis)
    apply_rope.__wrapped__ = original
    apply_rope.octet_qk = True
    return apply_rope


def _rope_module(qknorm: nn.Module):
    """The host module whose ``apply_rope`` Flux's attention calls (comfy.ldm.flux.math, in 0.3.75 and 0.29),
    for a QKNorm of comfy.ldm.flux.layers; else None."""
    owner = type(qknorm).__module__
    if not owner.endswith("ldm.flux.layers"):
        return None
    try:
        return importlib.import_module(owner[: -len("layers")] + "math")
    except ImportError:
        return None


def patch_rope(qknorm: nn.Module) -> bool:
    """Wrap the host's ``apply_rope`` once per process so that pending q/k pairs take the fused kernel.
    Everything else (any model's real tensors) goes to the host's function unchanged."""
    math_module = _rope_module(qknorm)
    current = getattr(math_module, "apply_rope", None)
    if current is None:
        return False
    if not getattr(current, "octet_qk", False):
        math_module.apply_rope = _rope_wrapper(current)
    return True


def _rms_params(norm: nn.Module, x: torch.Tensor) -> Optional[tuple[torch.Tensor, float]]:
    """(weight, eps) of one of QKNorm's RMSNorms if the fused kernel computes exactly what its forward does
    on ``x``: 0.3.75's comfy.ldm.flux.layers.RMSNorm (eps 1e-6 in its forward) or 0.29's torch.nn.RMSNorm
    (eps None: torch uses the dtype's epsilon), with the weight in x's dtype on x's device and no weight
    patches (LoRA under lowvram); else None."""
    if isinstance(norm, nn.RMSNorm):
        weight = norm._parameters.get("weight")
        if weight is None or tuple(norm.normalized_shape) != (x.shape[-1],):
            return None
        eps = norm.eps if norm.eps is not None else torch.finfo(x.dtype).eps
    elif type(norm).__name__ == "RMSNorm" and type(norm).__module__.endswith("ldm.flux.layers"):
        weight, eps = norm._parameters.get("scale"), 1e-6
    else:
        return None
    if getattr(norm, "weight_function", None) or getattr(norm, "bias_function", None):
        return None
    if not isinstance(weight, torch.Tensor) or weight.dtype != x.dtype or weight.device != x.device:
        return None
    return weight, eps


class QKPrepForward(DeferredForward):
    """A replacement forward of a QK norm whose pending output goes to attention's q/k preparation (one
    kernel, kernels/backends/triton_rope.py) rather than to an INT8 consumer: it serves float layers as
    well (``install_qk``). Defers only where the kernels run and nothing is compiled or tracked by autograd."""

    def __init__(self, module: nn.Module, container: Optional[nn.Module] = None, consumers: tuple = ()):
        super().__init__(module, module, ())

    @staticmethod
    def _may_defer(x: torch.Tensor) -> bool:
        return enabled() and kernel_input(x)


class DeferredQKForward(QKPrepForward):
    """Flux's QKNorm ``forward(q, k, v)``: pending q and k when the fused q/k kernel can take them at the
    host's ``apply_rope``, the host's forward otherwise."""

    kind = PendingQK

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        module = self.module
        if self._may_defer(q) and type(k) is torch.Tensor and q.dtype == k.dtype == v.dtype and q.dim() == 4:
            norms = module._modules
            pq, pk = _rms_params(norms["query_norm"], q), _rms_params(norms["key_norm"], k)
            if pq is not None and pk is not None and not _tracked(q, k, pq[0], pk[0]) and patch_rope(module):
                return PendingQK(((q, *pq),), v.dtype), PendingQK(((k, *pk),), v.dtype)
        return type(module).forward(module, q, k, v)


class DeferredRMSForward(QKPrepForward):
    """SD3's ln_q / ln_k ``forward`` (mmdit.RMSNorm with a weight): a ``PendingRMS`` when the kernel can compute
    it in a call that CUDA Graph Step captures, the host's forward otherwise.

    Only for graphs: the saving is GPU time (6.9 vs 96.9 us per q or k at SD3.5's 1024² shapes), while the
    pending bookkeeping and the launches cost host time, and SD3.5's eager step is host-bound. H200, ComfyUI
    0.3.75, bf16 SD3.5-medium step: eager 52.2 ms, 79.3 with the deferral (a cProfile puts the difference in
    PendingRMS / rms_norm_heads host code, ~0.3 ms per block); in a graph 35.5 vs 29.7 ms
    (docs/BENCHMARKS.md, fifth session). Flux's q/k preparation saves ~0.5 ms of GPU time per attention and
    stays on in eager steps too."""

    kind = PendingRMS

    def __call__(self, x: torch.Tensor):
        module = self.module
        # _for_graph first: in an eager step (host-bound, where this never defers) it is the one check made.
        if type(x) is torch.Tensor and _for_graph(x) and self._may_defer(x):
            from ..kernels.backends import triton_rope
            w = module.weight
            if (isinstance(w, torch.Tensor) and w.dtype == x.dtype and not _tracked(x, w)
                    and not getattr(module, "weight_function", None) and triton_rope.takes_rows(x, w)):
                return PendingRMS(((x, w, module.eps),), x.dtype)
        return type(module).forward(module, x)


# Digests (octet/host_code.py) of the host code WanQKForward writes out: WanSelfAttention.forward
# and comfy.ldm.flux.math.apply_rope1 as ComfyUI 0.3.75 and 0.29.0 ship them (0.29 adds attn1_patch, and its
# apply_rope1 dispatches to comfy-kitchen, whose kernels compute the same fp32 rotation).
WAN_SOURCES = {"WanSelfAttention.forward": {"d821b5b8b4f68296", "e57709825263ea24"},
               "apply_rope1": {"3515b31891122275", "f6786f4369e3465a"}}


class WanQKForward(QKPrepForward):
    """Wan's ``WanSelfAttention.forward``: q and k each prepared in one kernel (RMSNorm over the projection's whole
    width, then each head's RoPE: ``triton_rope.row_norm_rope``), where the host runs the norm and then
    apply_rope1, which on ComfyUI 0.3.75 is four passes in fp32 (a 2 x 14,040-token Wan 2.1 1.3B step: q and k are
    43 M values each, 30 times a step). The rest is the host's forward as written: the same projections in the
    same order (a q/k/v group's fused GEMM included), the host's attention and ``o``. Where the kernel cannot
    take a tensor (or under an attn1_patch, autograd, torch.compile, a CPU without the interpreter) the host's
    forward runs."""

    def __call__(self, x, freqs, transformer_options={}):     # noqa: B006 - the host's signature
        module = self.module
        if type(x) is not torch.Tensor and isinstance(x, Pending):
            # The block's modulated norm1 (octet/float_fusions.py NormModulateForward): computed here, once, for
            # the q/k/v projections (a shared-input group's GEMM takes real tensors only).
            x = x.materialize()
        if self._may_defer(x) and type(freqs) is torch.Tensor \
                and not (transformer_options.get("patches") or {}).get("attn1_patch"):
            host = host_code.module_of(module)
            mods = module._modules
            params = [_rms_params(mods[name], x) for name in ("norm_q", "norm_k")]
            if all(p is not None and not _tracked(x, p[0]) for p in params):
                b, s, n, d = *x.shape[:2], module.num_heads, module.head_dim
                q = self._prepared(host, mods["q"], mods["norm_q"], params[0], x, freqs, (b, s, n, d))
                k = self._prepared(host, mods["k"], mods["norm_k"], params[1], x, freqs, (b, s, n, d))
                out = host.optimized_attention(q.view(b, s, n * d), k.view(b, s, n * d),
                                               mods["v"](x).view(b, s, n * d), heads=module.num_heads,
                                               transformer_options=transformer_options)
                return mods["o"](out)
        return type(module).forward(module, x, freqs, transformer_options=transformer_options)

    @staticmethod
    def _prepared(host, linear, norm, params, x, freqs, shape):
        """``apply_rope1(norm(linear(x)).view(shape), freqs)``: in the kernel where it takes the projection's
        output, else as the host computes it."""
        from ..kernels.backends import triton_rope
        y = linear(x)
        weight, eps = params
        # A hook or object patch on the norm would be skipped by the kernel: those norms run as the host runs them.
        plain = not (norm._forward_hooks or norm._forward_pre_hooks or "forward" in norm.__dict__)
        if plain and type(y) is torch.Tensor and y.dtype == weight.dtype \
                and triton_rope.takes_row_rope(y, weight, freqs, shape[2]):
            return triton_rope.row_norm_rope(y, weight, eps, freqs, shape[2])
        return host.apply_rope1(norm(y).view(shape), freqs)


def _wan_sources(cls: type) -> dict:
    return {"WanSelfAttention.forward": host_code.digest(cls.forward),
            "apply_rope1": host_code.digest(importlib.import_module(cls.__module__).apply_rope1)}


def _is_wan_self_attention(m) -> bool:
    """A plain Wan self-attention (not its cross-attention subclasses) with RMSNorm q/k norms, in host code
    WanQKForward was written from."""
    return (type(m).__name__ == "WanSelfAttention" and type(m).__module__.endswith("ldm.wan.model")
            and isinstance(m._modules.get("norm_q"), nn.RMSNorm) and isinstance(m._modules.get("norm_k"), nn.RMSNorm)
            and host_code.known("Wan self-attentions", type(m), _wan_sources, WAN_SOURCES))


def _is_sd3_qk_rms(m) -> bool:
    return (type(m).__name__ == "RMSNorm" and type(m).__module__.endswith("diffusionmodules.mmdit")
            and isinstance(getattr(m, "weight", None), torch.Tensor))


def _is_flux_qknorm(m) -> bool:
    return (type(m).__name__ == "QKNorm" and _rope_module(m) is not None
            and isinstance(getattr(m, "query_norm", None), nn.Module) and isinstance(getattr(m, "key_norm", None), nn.Module))


def _is_gelu_tanh(m) -> bool:
    return isinstance(m, nn.GELU) and m.approximate == "tanh"


def _is_plain_layer_norm(m) -> bool:
    return (isinstance(m, nn.LayerNorm) and m.weight is None and m.bias is None
            and len(m.normalized_shape) == 1)


def _consumes(layer) -> bool:
    return getattr(layer, "act", "none") in ("dynamic", "static") and getattr(layer, "kind", None) == "linear"


# LayerNorms without affine whose modulated output feeds linears, by attribute: Flux's DoubleStreamBlock and
# SingleStreamBlock, SD3's DismantledBlock (norm1 feeds attn and, in SD3.5's x_block_self_attn blocks, attn2),
# Wan's WanAttentionBlock (norm2 -> addcmul -> the FFN's first linear; its norm1 feeds a q/k/v group, whose
# fused GEMM takes real tensors only).
_NORM_SITES = (
    ("img_norm1", ("img_attn.qkv",)), ("img_norm2", ("img_mlp.0",)),
    ("txt_norm1", ("txt_attn.qkv",)), ("txt_norm2", ("txt_mlp.0",)),
    ("pre_norm", ("linear1",)),
    ("norm1", ("attn.qkv", "attn2.qkv")), ("norm2", ("mlp.fc1",)), ("norm2", ("ffn.0",)),
)


def sites(model: nn.Module, replacements: dict[str, nn.Module]) -> dict[str, tuple[type, str, tuple[str, ...]]]:
    """{module name: (forward class, container name, consumer paths)} for Flux single blocks' GELU
    (``mlp_act`` -> cat -> ``linear2``) and the plain LayerNorms of _NORM_SITES whose (modulated) output
    goes into an INT8-activation linear, or will per ``replacements``; and every Flux QKNorm and SD3 ln_q /
    ln_k (no consumer: their pending outputs go to the host's apply_rope / attention), and every Wan
    self-attention (its q/k preparation in one kernel each)."""
    from . import fusion   # here, not at the top: fusion imports modules, which imports this module
    found = {}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""

        def consumers(paths):
            return tuple(p for p in paths if _consumes(replacements.get(prefix + p, _resolve(module, p))))

        # A GELU feeding an MLP's fc2 directly is not deferred: without a head to join, the fused kernel
        # measured slower than the float GELU plus the plain quantizer (H200, 4608 x 12288: 152.2 vs 123.2 us
        # in one tile, 138.1 vs 122.6 in two sweeps; docs/bench/deferred_kernels_*h200_2026-12-02.json).
        # Flux's single block, where it also replaces the cat: 138.9 vs 309.6 us.
        candidates = [(DeferredNormForward, attr, paths) for attr, paths in _NORM_SITES
                      if _is_plain_layer_norm(module._modules.get(attr))]
        if _is_gelu_tanh(getattr(module, "mlp_act", None)) and not getattr(module, "yak_mlp", False) \
                and fusion.chain_parts(module) is None:
            candidates.insert(0, (DeferredGeluForward, "mlp_act", ("linear2",)))
        for kind, attr, paths in candidates:
            taken = consumers(paths)
            if taken:
                found[prefix + attr] = (kind, name, taken)
        if _is_flux_qknorm(module):
            found[name] = (DeferredQKForward, name, ())
        if _is_wan_self_attention(module):
            found[name] = (WanQKForward, name, ())
        if hasattr(module, "qkv"):
            for attr in ("ln_q", "ln_k"):
                if _is_sd3_qk_rms(module._modules.get(attr)):
                    found[prefix + attr] = (DeferredRMSForward, prefix + attr, ())
    return found


def forwards(model: nn.Module, replacements: dict[str, nn.Module]) -> dict[str, DeferredForward]:
    """The deferred forward per site (api.quantize_ adds them to its object patches)."""
    return {n: kind(model.get_submodule(n), model.get_submodule(container), paths)
            for n, (kind, container, paths) in sites(model, replacements).items()}


def install_qk(model: nn.Module) -> list[str]:
    """In place: defer the q/k preparation of every Flux QKNorm and SD3 ln_q / ln_k of ``model`` (quantized or
    not)."""
    found = {n: kind for n, (kind, _, _) in sites(model, {}).items() if issubclass(kind, QKPrepForward)}
    return set_forwards(model, module_forwards(model, found))


def install(model: nn.Module) -> list[str]:
    """In place (a loaded checkpoint): defer every site of ``model``."""
    return set_forwards(model, forwards(model, {}))
