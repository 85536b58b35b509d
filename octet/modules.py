"""QuantLinear and QuantConv2d: one INT8 layout, its tensors, and a kernel plan per input signature.

The tensors are named as ComfyUI's quantized checkpoints name them (``weight`` int8,
``weight_scale`` fp32 [N, 1], ``input_scale``, ``pre_quant_scale``), so a state dict of these
modules *is* the checkpoint format; the format itself (math, comfy_quant record) is the layer's
``layout`` (octet/layout.py).

The hot path is the plan: the first call at an input signature (device, dtype, M bucket) selects a
backend and lets it prepare the weight side once (``kernels.plan``); later calls are a dict lookup,
a validity check and the backend's run function. Plans are dropped when the weight tensor is
replaced or written in place (LoRA merge/unmerge by the host), when scales change, and when the
module moves (``_apply``).

They also carry the attributes ComfyUI's ModelPatcher looks for on its own ops
(``comfy_cast_weights``, ``weight_function``, ``bias_function``): the patcher can then leave a
layer's weights in CPU RAM under lowvram (we move them per call, as comfy.ops does) or attach
weight functions such as on-the-fly LoRA (we apply them to the dequantized weight). Nothing here
imports ComfyUI.
"""
from __future__ import annotations

import weakref
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import kernels
from ..kernels.operands import ConvGeometry, Int8Operands
from ..kernels.dispatch import planning_for_graph
from ..kernels.registry import m_bucket
from .deferred import Pending, PendingGelu, PendingNorm, PendingOutput
from .layout import Int8Layout
from . import compile_pass, stream_ahead
from .timestep import GroupSelector


# -- host hook (set by nodes/host_compat.py; the core never imports ComfyUI) ----------------------
# What the host's ``weight_function`` patches (LoRA under lowvram) take: ComfyUI 0.3.75's
# LowVramPatch takes the stored form and converts it itself (through our convert_weight/set_weight);
# 0.29's takes the float weight (its ops dequantize before applying them) and ignores those hooks.
WEIGHT_FUNCTIONS_TAKE_FLOAT = False


class Plan(NamedTuple):
    """One input signature's kernel choice, valid while ``weight`` is the same tensor at ``version``."""
    weight: torch.Tensor
    version: int
    run: Callable                         # run(x, static_scale) -> y
    scales: Optional[list]                # static scale per timestep group, on the device (None: dynamic)
    impl: object                          # the kernels.registry.Implementation chosen
    operands: Int8Operands                # what the backend prepared from (its memo holds kept copies)


class ChainPlan(NamedTuple):
    """A static MLP chain's run function, valid while both layers' own plans are."""
    fc1: Plan
    fc2: Plan
    run: Callable                         # run(x, scale1, scale2) -> y


# Exact input shapes a layer remembers for its forward's lookup (beyond: forgotten and relearned; plans stay).
_SHAPES_KEPT = 64


# kernels.ops.compiling's test without its wrapper (~30 ns a QuantLayer call); torch.compile reads it as True.
_compiling = torch.compiler.is_compiling


def _version(t: torch.Tensor) -> int:
    """In-place write counter; inference tensors (made under torch.inference_mode) have none, and
    their in-place writes go through set_weight, which drops plans itself."""
    return -1 if t.is_inference() else t._version


def same_storage(a, b) -> bool:
    """Both tensors, the same memory seen the same way: a rewrap (``nn.Parameter(t)``), not a copy or a cast."""
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.device == b.device
            and a.dtype == b.dtype and a.shape == b.shape and a.data_ptr() == b.data_ptr())


def _on(t: Optional[torch.Tensor], device: torch.device) -> Optional[torch.Tensor]:
    if t is None or t.device == device:
        return t
    return t.to(device, non_blocking=True)


class QuantLayer(nn.Module):
    """Shared state and forward logic; subclasses supply the float op and their geometry."""

    kind = ""

    # ComfyUI's ModelPatcher asks whether a module *has* ``comfy_cast_weights``: if so, the legacy patcher may
    # leave its weights in CPU RAM under lowvram (True: we move them per call, as comfy.ops does), and 0.29's
    # dynamic-VRAM patcher (its default on NVIDIA) stages them through comfy-aimdo's virtual buffers, which only
    # comfy.ops reads: an Octet layer would find its int8 weight on the CPU and copy it over at every call. So
    # under dynamic VRAM the layer hides the attribute (``load_whole``) and the patcher moves its tensors to the
    # GPU as it does any plain module's, accounted and restored on unload.
    @property
    def comfy_cast_weights(self) -> bool:
        value = self.__dict__.get("_comfy_cast", False)
        if value is None:
            raise AttributeError("comfy_cast_weights")
        return value

    @comfy_cast_weights.setter
    def comfy_cast_weights(self, value: bool) -> None:
        if self.__dict__.get("_comfy_cast", False) is not None:
            self.__dict__["_comfy_cast"] = bool(value)

    def load_whole(self) -> None:
        """Let a dynamic-VRAM patcher load this layer's tensors whole (see ``comfy_cast_weights``)."""
        self.__dict__["_comfy_cast"] = None

    def stream_per_call(self) -> None:
        """Let a dynamic-VRAM patcher leave this layer's tensors in RAM: it then copies them to the GPU at each
        call (the lowvram path of ``forward``; ahead of the call, on a copy stream, once the order of the streamed
        calls is known: octet/stream_ahead.py). For an INT8 model that does not fit whole (nodes/dynamic_vram.py).
        Pinned now, before any call: the copies are asynchronous, and their addresses stay put, so a CUDA graph
        could record them (a GPU test replays them). The graph step still runs such a model eager: turned on, SDXL
        with 2.5 GiB free ran out of memory in the graph warm-up's tuning, then (H200, 2026-12-04, later call)
        inside the capture itself, which left the process unable to allocate."""
        self.__dict__["_comfy_cast"] = False
        self.pin_ram()

    def pin_ram(self) -> None:
        """Swap this layer's tensors in RAM for pinned ones, in place (no second copy; the Parameters stay)."""
        if not torch.cuda.is_available():
            return
        for t in (*self._parameters.values(), *self._buffers.values()):
            if t is not None and t.device.type == "cpu" and not t.is_pinned():
                t.data = t.data.pin_memory()

    def __init__(self, qweight: torch.Tensor, weight_scale: torch.Tensor, bias: Optional[torch.Tensor],
                 act: str, backend: str = "auto", goal: str = "speed"):
        super().__init__()
        self.layout = Int8Layout(self.kind, act, goal)
        if qweight.dtype != torch.int8:
            raise TypeError(f"qweight must be int8, got {qweight.dtype}")
        if weight_scale.numel() != qweight.shape[0]:
            raise ValueError(f"weight_scale has {weight_scale.numel()} values for {qweight.shape[0]} output channels")
        self.weight = nn.Parameter(qweight, requires_grad=False)
        self.register_buffer("weight_scale", weight_scale.float().reshape(-1, 1).contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.register_buffer("input_scale", None)       # static W8A8: [groups] fp32
        self.register_buffer("pre_quant_scale", None)   # SmoothQuant divisor: [in_channels] fp32
        self.backend = backend
        self.group_selector: Optional[GroupSelector] = None
        self.weight_function = []
        self.bias_function = []
        self._patched_scale = None  # (weakref to weight, its _version, scale) after a merged LoRA
        self._plans: dict = {}
        self._by_shape: dict = {}   # x.shape -> (dtype, device index, graph, weight, version, plan): forward's lookup
        self._operands: dict = {}   # device -> (weight, version, Int8Operands) shared by that device's plans
        self.op_owner = kernels.ops.register_owner(self)   # compiled graphs reach this layer's plans through it
        self.fused_group = None     # octet/shared_input.py: linears that read this layer's input, run as one GEMM
        self._pinned: dict = {}     # signature -> backend an earlier call at it ran on (pin_backend)

    # -- format ------------------------------------------------------------------------------------
    @property
    def act(self) -> str:
        return self.layout.act

    @act.setter
    def act(self, act: str) -> None:
        """Another activation mode for the same int8 weights (a new layout; plans are rebuilt)."""
        self.layout = Int8Layout(self.layout.kind, act, self.layout.goal)
        self._pinned = {}       # another format computes other numbers anyway: plan afresh (pin_backend)
        self.invalidate()

    @property
    def goal(self) -> str:
        return self.layout.goal

    @goal.setter
    def goal(self, goal: str) -> None:
        self.layout = Int8Layout(self.layout.kind, self.layout.act, goal)
        self._pinned = {}       # the memory goal keeps no float weights: a pin to the float path must go
        self.invalidate()

    def __getstate__(self):
        # A group (octet/shared_input.py) belongs to the layers in place: a copy runs its own plans.
        state = dict(self.__dict__)
        state["fused_group"] = None
        return state

    def __setstate__(self, state):
        # copy.deepcopy and pickle: the copy holds other tensors, so it gets its own owner number.
        super().__setstate__(state)
        self.op_owner = kernels.ops.register_owner(self)

    def invalidate(self) -> None:
        """Drop every kernel plan (and what backends prepared for it), and its group's fused layer."""
        self._plans = {}
        self._by_shape = {}
        self._operands = {}
        group = self.__dict__.get("fused_group")
        if group is not None:
            group.invalidate()

    def __setattr__(self, name, value):
        if name not in ("weight", "bias") or "_plans" not in self.__dict__:
            return super().__setattr__(name, value)
        old = self._parameters.get(name)
        super().__setattr__(name, value)
        if not same_storage(old, value):
            # The host replaced a parameter (0.29's dynamic VRAM puts the CPU weight back on unload): plans
            # made for the old tensor (its float copy, the group's fused layer) would hold its device memory.
            # The same storage rewrapped (a reload that kept the loaded tensor) changes nothing.
            self.invalidate()

    def _apply(self, fn, recurse=True):
        self.invalidate()   # moved or cast: prepared weights belong to the old tensors
        return super()._apply(fn, recurse)

    def set_smoothing(self, smooth: torch.Tensor) -> None:
        if self.act == "none":
            raise ValueError("SmoothQuant needs INT8 activations; it has no meaning for weight-only layers.")
        self.pre_quant_scale = smooth.detach().float().reshape(-1).clone()
        self.invalidate()

    # -- static activation scales (timestep groups) -------------------------------------------
    def set_static_scales(self, input_scale: torch.Tensor, selector: Optional[GroupSelector] = None) -> None:
        scales = input_scale.detach().float().reshape(-1).clone()
        if not torch.isfinite(scales).all() or (scales <= 0).any():
            raise ValueError("static input scales must be finite and positive")
        self.input_scale = scales
        self.group_selector = selector
        self.invalidate()

    def _group(self) -> int:
        if self.group_selector is None or self.input_scale.numel() == 1:
            return 0
        return self.group_selector.index

    def _static_scale(self, device: torch.device) -> Optional[torch.Tensor]:
        if self.act != "static":
            return None
        if self.input_scale is None:
            raise RuntimeError("This layer is static W8A8 but has no input_scale: quantize it with a CALIBRATION.")
        group = self._group()
        return _on(self.input_scale[group:group + 1], device)

    # -- weights ---------------------------------------------------------------------------------
    # ComfyUI patches weights (LoRA) through three hooks it looks up by name on the op:
    #   convert_weight(raw)  -> the float weight the patch math works on;
    #   set_weight(float)    -> store the patched weight (merged: re-quantized to int8), or with
    #                           return_weight=True hand back the raw form for a per-call patch;
    #   weight_function[...] -> per-call patches (lowvram), applied to the raw form.
    # "Raw" is the int8 code as a float tensor: raw * scale / smooth is the float weight.
    def current_weight_scale(self) -> torch.Tensor:
        """The scale of the int8 codes now in ``weight``: a merged LoRA re-quantizes with new scales,
        which hold only while that exact tensor is in place (the host restores the original
        weight by replacing or overwriting it, which retires them)."""
        patched = self._patched_scale
        if patched is None:  # the common case, and the only one torch.compile needs to trace
            return self.weight_scale
        ref, version, scale = patched
        if ref() is self.weight and _version(self.weight) == version:
            return scale
        self._patched_scale = None
        return self.weight_scale

    def convert_weight(self, weight: torch.Tensor, inplace: bool = False, **kwargs) -> torch.Tensor:
        return self.layout.unfold_smoothing(self.layout.scale_raw(weight, self.current_weight_scale()),
                                            self.pre_quant_scale)

    def set_weight(self, weight: torch.Tensor, inplace_update: bool = False, seed=None, return_weight: bool = False,
                   **kwargs):
        w = self.layout.fold_smoothing(weight.float(), self.pre_quant_scale)
        if return_weight:
            return self.layout.scale_raw(w, 1.0 / self.current_weight_scale())
        q, scale = kernels.quantize_weight(w)
        q = q.to(self.weight.device)
        if inplace_update:
            self.weight.data.copy_(q)
        else:
            self.weight = nn.Parameter(q, requires_grad=False)
        self._patched_scale = (weakref.ref(self.weight), _version(self.weight), scale.to(self.weight_scale.device))
        self.invalidate()

    def dequantized_weight(self, dtype=torch.float32, device=None) -> torch.Tensor:
        device = device or self.weight.device
        return self.convert_weight(_on(self.weight, device).to(dtype))

    def _float_operands(self, x: torch.Tensor):
        """Float weight and bias with ComfyUI's weight/bias functions applied (LoRA under lowvram etc.)."""
        w = _on(self.weight, x.device).to(x.dtype)
        if WEIGHT_FUNCTIONS_TAKE_FLOAT:
            w = self.convert_weight(w)
        for f in self.weight_function:
            w = f(w)
        if not WEIGHT_FUNCTIONS_TAKE_FLOAT:
            w = self.convert_weight(w)
        b = _on(self.bias, x.device)
        if b is not None:
            b = b.to(x.dtype)
            for f in self.bias_function:
                b = f(b)
        return w, b

    # -- kernels ---------------------------------------------------------------------------------
    def operands(self, device: torch.device, copy_on: Optional[Callable] = None) -> Int8Operands:
        """The weight side as kernels take it, on ``device`` (``copy_on``: see ``Int8Operands.of``)."""
        return Int8Operands.of(self.weight, self.current_weight_scale(), self.bias, self.pre_quant_scale,
                               self.geometry, device=device, copy_on=copy_on)

    def weight_state(self) -> tuple:
        """(weight tensor, its in-place write counter): what a plan or a copy made from the weight is valid for."""
        w = self._parameters["weight"]
        return w, _version(w)

    def _shared_operands(self, device: torch.device, w: torch.Tensor) -> Int8Operands:
        """One Int8Operands per device for all plans there, so what backends keep in its memo (the speed
        goal's float copy, the transposed CPU weight) is made once per layer, not once per M bucket."""
        cached = self._operands.get(device)
        if cached is None or cached[0] is not w or cached[1] != _version(w):
            cached = self._operands[device] = (w, _version(w), self.operands(device))
        return cached[2]

    def _signature(self, x: torch.Tensor) -> tuple:
        # Graph and eager calls plan apart: backends weigh host cost only for eager ones (kernels.dispatch).
        return (x.device, x.dtype, m_bucket(x.numel() // x.shape[-1 if self.kind == "linear" else 1]),
                planning_for_graph())

    def _cached_plan(self, x: torch.Tensor):
        """x's signature's plan if one is cached and still made for the weight tensor in place, else None."""
        w = self._parameters["weight"]   # not self.weight: nn.Module.__getattr__ on every call
        entry = self._plans.get(self._signature(x))
        return entry if entry is not None and entry.weight is w and entry.version == _version(w) else None

    def plan(self, x: torch.Tensor):
        """(implementation, run, static scales per group on x's device) for x's signature: cached."""
        entry = self._cached_plan(x)
        if entry is None:
            with kernels.graph_pool.outside(x.device):   # kept past this call: not in a CUDA-graph warm-up's pool
                entry = self._new_plan(x)
        return entry

    def _new_plan(self, x: torch.Tensor):
        """``plan``'s cache miss: select, prepare the weight side, and keep the plan for x's signature."""
        key = self._signature(x)
        w = self._parameters["weight"]
        ops = self._shared_operands(x.device, w)
        backend = self._pinned.get(key, self.backend)
        impl, run = kernels.plan(self.layout.kernel_op, self.act, x, ops, backend, self.goal)
        scales = None
        if self.act == "static":
            if self.input_scale is None:
                raise RuntimeError("This layer is static W8A8 but has no input_scale: quantize it with a "
                                   "CALIBRATION.")
            on_device = _on(self.input_scale, x.device)
            scales = [on_device[g:g + 1] for g in range(on_device.numel())]
        entry = self._plans[key] = Plan(w, _version(w), run, scales, impl, ops)
        if impl.name == "float" and self.goal == "speed":
            kernels.registry.log_once("speed-goal-float-copy", "Octet (goal=speed): layers whose INT8 kernel is "
                                      "slower than bf16 at their shapes keep a float copy of their weight; "
                                      "octet.modules.plan_summary(model) lists them and the bytes.")
        return entry

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if type(x) is not torch.Tensor and isinstance(x, Pending):     # the type test first: ~30 ns less a call
            return self._forward_pending(x)
        if self.weight_function or self.bias_function:
            # A patch (e.g. LoRA under lowvram) changes the float weight: compute in float.
            return self._float_forward(x, *self._float_operands(x))
        if _compiling():
            return self._custom_op(x)
        if self.fused_group is not None:     # after compiling(): torch.compile traces each layer's custom op
            y = self.fused_group.forward(self, x)
            if y is not None:
                return y
        # The hot path: an eager SDXL step makes ~930 of these calls, host-bound. Keyed on x's exact shape alone
        # (a torch.Size hashes in a third of the time a (shape, dtype, device, flag) tuple takes), the rest of the
        # signature compared as a dtype's identity and device indexes; the plan's weight still in place, unwritten,
        # on x's device (a host that swaps a parameter's .data to another device keeps its identity). With the two
        # checks above, 1.43 -> 0.92 us of Python per call on this repository's CPU (the plan's run stubbed).
        w = self._parameters["weight"]
        hit = self._by_shape.get(x.shape)
        if hit is not None:
            dtype, device, graph, weight, version, entry = hit
            if dtype is x.dtype and weight is w and device == x.get_device() == w.get_device() \
                    and graph == planning_for_graph() and (version is None or w._version == version):
                return entry.run(x, None if entry.scales is None else entry.scales[self._group()])
        if w.device != x.device:
            # lowvram: the host keeps this layer's weights elsewhere and we move them per call, so
            # nothing weight-side can be prepared once. Planned with the memory goal: a layer without room
            # for its int8 weight has none for a float copy, and the speed goal would make that copy, from the
            # operands moved for this call only, at every call (SDXL streamed at 2.5 GiB free: 5.3 s per
            # step with the speed goal, 0.51 s with the memory goal; H200 2026-12-04).
            if x.device.type == "cuda" and w.device.type == "cpu" and not w.is_pinned():
                # Copied at every call: from pinned RAM, at the bus's speed and without stalling the host (the
                # legacy patcher's lowvram leaves layers in RAM too; the dynamic one's are pinned when streamed).
                self.pin_ram()
            ops = stream_ahead.operands(self, x.device)     # copied ahead of this call where it was expected
            _, run = kernels.plan(self.layout.kernel_op, self.act, x, ops, self.backend, "memory", one_call=True)
            y = run(x, self._static_scale(x.device))
            ops.free_copies(*self._parameters.values(), *self._buffers.values())    # this call's copies only
            return y
        plan = self.plan(x)
        if len(self._by_shape) >= _SHAPES_KEPT:
            self._by_shape.clear()
        # (An inference tensor has no write counter: -1 in the plan, nothing to compare.)
        self._by_shape[x.shape] = (x.dtype, x.get_device(), planning_for_graph(), w,
                                   None if plan.version == -1 else plan.version, plan)
        return plan.run(x, None if plan.scales is None else plan.scales[self._group()])

    def pin_backend(self, x: torch.Tensor, backend: str) -> None:
        """Plan ``x``'s signature on ``backend`` from now on: an earlier call at it computed this layer's output
        there (octet/shared_input.py: a group's fused GEMM, before the group learned it does not share its
        input), and the same input must keep giving the same numbers (the same seed, the same image)."""
        key = self._signature(x)
        self._pinned[key] = backend
        self._plans.pop(key, None)
        self._by_shape = {}

    def _deferred_plan(self, sample: torch.Tensor, entry: str):
        """The plan that takes a deferred input through its method ``entry`` (octet/deferred.py; ``sample``
        has the rows this layer will see), or None where it does not offer it; weight-only and per-call
        weight patches run as before. The plan is made here if this is the signature's first call: a
        signature's first call must take the same path as its later ones, or a prompt's first step (the
        first prompt's only) is computed differently from the same step of every later run, and the same
        seed gives another image the second time (seen on an H200, 2026-12-03: Wan's first prompt vs its
        repeat, max |latent diff| 0.45). Planning reads only the sample's rows, dtype and device."""
        if self.act == "none" or self.weight_function or self.bias_function \
                or self._parameters["weight"].device != sample.device:
            return None
        plan = self.plan(sample)
        # deferral_pays: the plan's own cost call (kernels/backends/triton_backend.py deferral_pays): eager
        # plans of GEMMs too short to hide the deferral's host time decline.
        return plan if plan is not None and hasattr(plan.run, entry) \
            and getattr(plan.run, "deferral_pays", True) else None

    def takes_deferred(self, sample: torch.Tensor, entry: str) -> bool:
        """Whether a module before this layer may hand over its input instead of its output."""
        return self._deferred_plan(sample, entry) is not None

    def _plan_static(self, plan: Plan) -> Optional[torch.Tensor]:
        """The static scale ``plan``'s run takes now (the current timestep group's), None for a dynamic plan."""
        return None if plan.scales is None else plan.scales[self._group()]

    def _fed(self, x: Pending, gelu: bool = False, residual=None) -> Optional[torch.Tensor]:
        """This layer's output for the deferred input ``x`` through its plan's deferred entry (``gelu``: the plan's
        GELU-epilogue twin's), or None where the plan does not take it (the caller then computes ``x``). With
        ``residual`` (res, gate): ``res + output * gate``, in the GEMM's epilogue where the plan takes it."""
        if x.computed is not None or kernels.ops.compiling():
            return None
        plan = self._deferred_plan(x.source, x.ENTRY)
        if plan is None or (gelu and not hasattr(plan.run, "with_gelu")):
            return None
        run, static = plan.run.with_gelu() if gelu else plan.run, self._plan_static(plan)
        if residual is None or _takes_residual(run, x.source, *residual):
            return x.feed(run, static, residual)
        y = x.feed(run, static)
        return None if y is None else kernels.ops.gated_residual(y, *residual)

    def _forward_pending(self, x: Pending) -> torch.Tensor:
        y = self._fed(x)
        return y if y is not None else self.forward(x.materialize())

    def extra_repr(self) -> str:
        groups = 0 if self.input_scale is None else self.input_scale.numel()
        return (f"act={self.act}, backend={self.backend}, goal={self.goal}, static_groups={groups}, "
                f"smooth={self.pre_quant_scale is not None}")


def _takes_residual(run, x, res, gate) -> bool:
    """Whether ``run`` adds a gated residual in its GEMM's epilogue rounded as the host (bf16 / fp16: in fp32 a GPU
    may contract the host's two roundings into one fused multiply-add)."""
    return hasattr(run, "takes_residual") and res.dtype in (torch.bfloat16, torch.float16) \
        and run.takes_residual(x, res, gate)


_NORM_KERNEL: list = []


def _float_norm_kernel(x: torch.Tensor):
    """On a GPU, the float ``addcmul(shift, layer_norm(x), mult)`` in one pass (triton_layernorm.NormModulate) for a
    compiled graph's fused call whose plan declines the norm input (short GEMMs: Flux's text stream, SD3.5): the
    pass took the LayerNorm and the modulation out of Inductor's one fused kernel, and the host's two ops would be
    two passes. None elsewhere (CPU: the host's ops, eager's numbers)."""
    from ..kernels.backends import triton_support
    if not (x.is_cuda and triton_support.runs_on(x)):
        return None
    if not _NORM_KERNEL:
        from ..kernels.backends import triton_layernorm
        _NORM_KERNEL.append(triton_layernorm.NormModulate())
    return _NORM_KERNEL[0]


class QuantLinear(QuantLayer):
    kind = "linear"
    geometry = None

    def __init__(self, qweight, weight_scale, bias, act, backend="auto", goal="speed"):
        super().__init__(qweight, weight_scale, bias, act, backend, goal)
        self.out_features, self.in_features = qweight.shape
        compile_pass.install()      # torch.compile then fuses its float neighbours as eager does (once a process)

    @classmethod
    def from_float(cls, linear: nn.Linear, act: str, backend: str = "auto",
                   smooth: Optional[torch.Tensor] = None, weight: Optional[torch.Tensor] = None,
                   goal: str = "speed") -> "QuantLinear":
        qweight, scale = Int8Layout.quantize(linear.weight if weight is None else weight, smooth)
        layer = cls(qweight, scale, linear.bias, act, backend, goal)
        if smooth is not None:
            layer.set_smoothing(smooth)
        return layer

    def _float_forward(self, x, w, b):
        return F.linear(x, w, b)

    def _custom_op(self, x):
        return kernels.ops.linear(x, self.weight, self.current_weight_scale(), self.bias, self.pre_quant_scale,
                                  self._static_scale(x.device), self.act, self.backend, self.goal, self.op_owner)

    def forward_gelu(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """gelu_tanh(self(x)) with the GELU in this layer's GEMM epilogue (an MLP's fc1: octet/fusion.py), the
        hidden activation written once; a deferred input (Wan's FFN takes its norm2 + modulation pending) goes
        through the plan's deferred entry as in ``_forward_pending``. None where the plan has no such epilogue
        (float or weight-only plans, another backend) or the layer is not called as planned (a weight patch, a
        shared-input group, lowvram's per-call weights, torch.compile): the caller runs the layer, then the GELU."""
        if not self._runs_as_planned():
            return None
        if type(x) is not torch.Tensor and isinstance(x, Pending):
            y = self._fed(x, gelu=True)
            if y is not None:
                return y
            x = x.materialize()
        if type(x) is not torch.Tensor or self._parameters["weight"].device != x.device:
            return None
        plan = self.plan(x)
        gelu = getattr(plan.run, "with_gelu", None)
        return None if gelu is None else gelu()(x, self._plan_static(plan))

    def fused_call(self, x: torch.Tensor, head, mult, shift, eps: float, input: str, gelu_out: bool,
                   static: Optional[torch.Tensor], res: Optional[torch.Tensor] = None,
                   gate: Optional[torch.Tensor] = None) -> torch.Tensor:
        """A compiled graph's octet::linear_fused on this layer (octet/compile_pass.py): the deferred input
        ``input`` describes (PendingGelu / PendingNorm) and the GELU epilogue through the same plan entries as
        eager's ``_forward_pending`` / ``forward_gelu``, so compiled and eager Octet give the same numbers; where the
        plan takes neither, the input computed by the host's float ops (on a GPU a LayerNorm + modulation in one
        pass, as Inductor's own kernel would have: _float_norm_kernel), the layer's plan, then the GELU. With
        ``res`` (never with ``gelu_out``): the block's gated residual ``res + output * gate`` (Flux's ``x += out *
        gate``), in the GEMM's epilogue where the plan takes it, rounded as the host's two ops, so the same numbers
        as eager's host ops."""
        residual = None if res is None else (res, gate)
        # The host's own cat / addcmul on pending tensors: they join where eager's would (same checks), else compute
        # the float tensor as eager does.
        if input == "gelu":
            x = PendingGelu(None, x)
            x = x if head is None else torch.cat((head, x), dim=-1)
        elif input == "norm":
            x = PendingNorm(x, eps, kernel=_float_norm_kernel(x))
            x = x if mult is None else torch.addcmul(shift, x, mult)
        if gelu_out:
            y = self.forward_gelu(x)
            if y is not None:
                return y
        elif type(x) is not torch.Tensor:
            y = self._fed(x, residual=residual)
            if y is not None:
                return y
        if type(x) is not torch.Tensor:
            x = x.materialize()
        run = self.plan(x).run
        if residual is not None:
            if _takes_residual(run, x, res, gate):
                return run.residual_output(x, static, res, gate, host_rounding=True)
            return kernels.ops.gated_residual(run(x, static), res, gate)
        y = run(x, static)
        return F.gelu(y, approximate="tanh") if gelu_out else y

    def pending_output(self, x: torch.Tensor) -> Optional[PendingOutput]:
        """This layer's output as a PendingOutput (octet/deferred.py) where its plan can add a block's gated residual
        in its GEMM's epilogue (a Wan block's FFN: octet/fusion.py), else None (the caller calls the layer)."""
        if type(x) is not torch.Tensor or not self._runs_as_planned() or self._parameters["weight"].device != x.device:
            return None
        plan = self.plan(x)
        if not hasattr(plan.run, "residual_output"):
            return None
        return PendingOutput(plan.run, x, self._plan_static(plan), self.out_features)

    def _runs_as_planned(self) -> bool:
        """Whether a call may go straight to this layer's plan's epilogue entries: INT8 activations, no per-call
        weight patch, no shared-input group computing it, outside torch.compile (which calls the custom op)."""
        return not (self.act == "none" or self.weight_function or self.bias_function or self.fused_group is not None
                    or _compiling())

    def chain_plan(self, fc2: "QuantLinear", x: torch.Tensor):
        """(run, scale1, scale2) for fc2(gelu_tanh(self(x))) with both layers static W8A8
        (octet/fusion.py): cached per signature, and rebuilt whenever either layer's own plan is."""
        p1, p2 = self.plan(x), fc2.plan(x)
        key = ("chain", id(fc2)) + self._signature(x)
        entry = self._plans.get(key)
        if entry is None or entry.fc1 is not p1 or entry.fc2 is not p2:
            with kernels.graph_pool.outside(x.device):
                entry = self._plans[key] = ChainPlan(p1, p2, kernels.plan_mlp(x, p1.operands, p2.operands,
                                                                              self.backend))
        return entry.run, p1.scales[self._group()], p2.scales[fc2._group()]


class QuantConv2d(QuantLayer):
    kind = "conv"

    def __init__(self, qweight, weight_scale, bias, act, backend="auto", goal="speed", *, stride=1, padding=0,
                 dilation=1, groups=1):
        super().__init__(qweight, weight_scale, bias, act, backend, goal)
        self.geometry = ConvGeometry.of(stride, padding, dilation, groups)
        self.out_channels = qweight.shape[0]
        self.in_channels = qweight.shape[1] * groups
        self.kernel_size = tuple(qweight.shape[2:])

    # nn.Conv2d's attribute names, read by the host and by tools that inspect layers.
    stride = property(lambda self: self.geometry.stride)
    padding = property(lambda self: self.geometry.padding)
    dilation = property(lambda self: self.geometry.dilation)
    groups = property(lambda self: self.geometry.groups)

    @classmethod
    def from_float(cls, conv: nn.Conv2d, act: str, backend: str = "auto",
                   smooth: Optional[torch.Tensor] = None, weight: Optional[torch.Tensor] = None,
                   goal: str = "speed") -> "QuantConv2d":
        if smooth is not None and conv.groups != 1:
            raise ValueError("SmoothQuant is only defined here for convolutions with groups=1")
        qweight, scale = Int8Layout.quantize(conv.weight if weight is None else weight, smooth)
        layer = cls(qweight, scale, conv.bias, act, backend, goal, stride=conv.stride, padding=conv.padding,
                    dilation=conv.dilation, groups=conv.groups)
        if smooth is not None:
            layer.set_smoothing(smooth)
        return layer

    def _float_forward(self, x, w, b):
        return F.conv2d(x, w, b, *self.geometry.args())

    def _custom_op(self, x):
        g = self.geometry
        if isinstance(g.padding, str):
            padding = list(g.explicit_padding(*self.kernel_size))
        else:
            padding = list(g.padding)
        return kernels.ops.conv2d(x, self.weight, self.current_weight_scale(), self.bias, self.pre_quant_scale,
                                  self._static_scale(x.device), list(g.stride), padding, list(g.dilation), g.groups,
                                  self.act, self.backend, self.goal, self.op_owner)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, " + super().extra_repr())


QUANT_TYPES = (QuantLinear, QuantConv2d)


def plan_summary(model: nn.Module) -> dict:
    """What the plans decided, per layer: backend per signature and the float copies the speed goal
    kept (bytes of VRAM/RAM beyond the int8 weights). Filled in as the model runs."""
    layers, kept, groups = {}, 0, {}
    for name, m in model.named_modules():
        if not isinstance(m, QuantLayer):
            continue
        if m.fused_group is not None:
            groups.setdefault(id(m.fused_group), (m.fused_group, []))[1].append(name)
        plans = [p for p in m._plans.values() if isinstance(p, Plan)]
        backends = sorted({p.impl.name for p in plans})
        operands = {id(p.operands): p.operands for p in plans}.values()   # plans of one device share theirs
        extra = sum(t.numel() * t.element_size() for ops in operands for t in ops.memo.values() if torch.is_tensor(t))
        kept += extra
        layers[name] = {"backends": backends, "extra_bytes": extra}
    # Groups' fused layers (octet/shared_input.py): the members' int8 weights side by side, and their float copy
    # where the speed goal keeps one (then the members keep none of their own).
    fused = {"+".join(names): group.fused_bytes() for group, names in groups.values()}
    return {"layers": layers, "fused_groups": fused, "extra_bytes": kept + sum(fused.values())}
