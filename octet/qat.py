"""Quantization-aware fine-tuning: fake quantization, learnable scales, LoRA, data-free distillation.

The recipe is EfficientDM's (He et al., 2024), sized for a node:

  * every QuantLinear / QuantConv2d gets a *fake-quant twin* that computes in float what the
    INT8 kernels compute: weights rounded to the same per-output-channel grid, activations to the
    same per-token (linear) / per-sample (conv) dynamic grid or the same static scale, round half
    to even and clamp to [-Q, Q] - but with straight-through gradients;
  * the trainable parameters are the scales (LSQ: the step size gets the gradient of the rounding
    it controls) and an optional low-rank correction ``B @ A`` added to the weight *before*
    quantization; the weights themselves and every other layer stay frozen;
  * the teacher is the float model itself: its denoiser outputs on its own sampling trajectories
    (``record_teacher``), so no training data is needed; the loss is the MSE between student and
    teacher outputs on one recorded denoiser call per step, so the autograd graph never spans more
    than one call (bounded memory);
  * ``fold`` turns every twin back into a real QuantLayer: LoRA merged into the weight, the weight
    re-quantized with the learned scales, the learned static scale written to ``input_scale``.
    Inference then runs the real INT8 kernels; no fake quantization remains.

Scales are learned in log space, as a log-ratio to the PTQ scale (TQT learns log2 thresholds the
same way): Adam's step is then a relative change whatever the layer's magnitude, and a scale can
never turn zero or negative.

Nothing here imports ComfyUI; the node (nodes/qat_nodes.py) records the teacher with the host's
own sampler and hands the calls to ``distill``.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels.torch_ref import MIN_SCALE, QMAX, quantize_weight, scale_from_absmax
from .api import OctetError, swapped  # noqa: F401  (swapped: re-exported, QAT trains inside it)
from .modules import QuantConv2d, QuantLayer, QuantLinear

WEIGHT_BITS = (8, 4)


def qmax_for(bits: int) -> float:
    if bits not in WEIGHT_BITS:
        raise OctetError(f"weight_bits={bits} is not supported; choose one of {list(WEIGHT_BITS)}.")
    return float(2 ** (bits - 1) - 1)


@dataclass(frozen=True)
class QATConfig:
    """How to fine-tune. ``lr`` applies to the log-scales and, unless ``lora_lr`` is set, to LoRA."""
    steps: int = 100
    lr: float = 1e-3
    lora_rank: int = 4
    lora_lr: Optional[float] = None
    weight_bits: int = 8          # 4: a 4-bit grid stored in int8 (same kernels; a quality experiment)
    learn_weight_scales: bool = True
    learn_act_scales: bool = True
    seed: int = 0
    log_every: int = 10
    eval_calls: int = 8           # held-back calls scored before and after training (never trained on)

    def __post_init__(self):
        if self.steps < 0:
            raise OctetError(f"steps={self.steps}: use 0 (no training) or more.")
        if not self.lr > 0 or (self.lora_lr is not None and not self.lora_lr > 0):
            raise OctetError("Learning rates must be positive (try 1e-3).")
        if self.lora_rank < 0:
            raise OctetError(f"lora_rank={self.lora_rank}: use 0 (no LoRA) or a small rank such as 4.")
        qmax_for(self.weight_bits)


# -- fake quantization ------------------------------------------------------------------------------
def round_ste(x: torch.Tensor) -> torch.Tensor:
    """torch.round (half to even, like the kernels) forward, identity backward."""
    return x + (torch.round(x) - x).detach()


def fake_quant(x: torch.Tensor, scale: torch.Tensor, qmax: float = QMAX) -> torch.Tensor:
    """clamp(round(x / scale)) * scale in float, with LSQ/STE gradients to x and scale.

    The division is written exactly as ``torch_ref.quantize_with_scale`` writes it, so the integer
    grid points chosen here are the ones the real kernels choose (tested bit for bit). Clamping
    before rounding gives the same integers (qmax is an integer) and LSQ's gradient mask |x/s| <= Q;
    clamping the straight-through value afterwards would drop gradients at random near the edge,
    where x + (round(x) - x) lands one ulp beyond qmax.
    """
    return round_ste(torch.clamp(x / scale, -qmax, qmax)) * scale


absmax_scale = scale_from_absmax  # the kernels' own rule (one copy)


def quantize_weight_bits(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric quantization to ``bits`` (8 or 4), stored as int8 + scale [N, 1]:
    ``torch_ref.quantize_weight`` with that width's grid. 4-bit values live in int8 containers, so the
    INT8 kernels run them unchanged (no memory saving: a quality experiment)."""
    return quantize_weight(weight, qmax_for(bits))


def _quantize_input(x: torch.Tensor, conv: bool, static_scale: Optional[torch.Tensor]) -> torch.Tensor:
    """Fake-quantize an activation with the kernels' granularity: per token / per sample / static."""
    if static_scale is not None:
        return fake_quant(x, static_scale.reshape(()))
    if conv:
        absmax = x.detach().reshape(x.shape[0], -1).abs().amax(dim=1).reshape(-1, 1, 1, 1)
    else:
        absmax = x.detach().abs().amax(dim=-1, keepdim=True)
    # The dynamic scale is a statistic of the data, not a parameter the kernels could take: no gradient.
    return fake_quant(x, absmax_scale(absmax))


class FakeQuantLayer(nn.Module):
    """Float twin of a QuantLayer with trainable (log-)scales and optional LoRA; see module docstring.

    ``latent_weight`` is the float weight in the kernel's domain (i.e. multiplied by the SmoothQuant
    factor where the layer has one), taken from the float model when available: re-rounding it with
    the initial scales reproduces the PTQ int8 weight exactly, and learned scales may move a weight
    to the other grid point, which a dequantized int8 weight could not tell.
    """

    is_conv = False

    def __init__(self, layer: QuantLayer, float_weight: Optional[torch.Tensor] = None, rank: int = 0,
                 weight_bits: int = 8, learn_weight_scales: bool = True, learn_act_scales: bool = True,
                 generator: Optional[torch.Generator] = None):
        super().__init__()
        if layer.weight_function or layer.bias_function:
            raise OctetError("This quantized layer carries weight patches (a LoRA or similar). Run QAT Fine-tune "
                             "before applying LoRAs to the quantized MODEL.")
        device = layer.weight.device
        smooth = layer.pre_quant_scale
        if float_weight is None:
            latent = layer.dequantized_weight(torch.float32, device)
            latent = layer.layout.fold_smoothing(latent, smooth)  # back to the smoothed domain the int8 weight lives in
        else:
            if tuple(float_weight.shape) != tuple(layer.weight.shape):
                raise OctetError(f"The float weight has shape {tuple(float_weight.shape)} but the quantized layer "
                                 f"{tuple(layer.weight.shape)}: connect the float MODEL this one was quantized from.")
            latent = float_weight.detach().to(device)
            if smooth is not None:  # exactly what from_float did before quantizing
                latent = layer.layout.fold_smoothing(latent.float(), smooth)
        # clone(): inputs may be inference tensors (ComfyUI runs nodes under inference_mode), which
        # autograd refuses to save; a fresh copy made outside inference mode is a normal tensor.
        self.register_buffer("latent_weight", latent.clone())
        self.weight_bits = weight_bits
        self.qmax = qmax_for(weight_bits)
        if weight_bits == 8:
            scale = layer.weight_scale.detach().float().clone()
        else:
            scale = quantize_weight_bits(latent, weight_bits)[1].to(device)
        # scale = initial * exp(log_ratio), log_ratio starting at 0: exp(0) == 1 exactly, so the twin
        # starts on the very grid of the real layer (exp(log(s)) could be one ulp off s).
        self.register_buffer("weight_scale0", scale.reshape(-1, 1))
        self.log_weight_scale = nn.Parameter(torch.zeros_like(self.weight_scale0), requires_grad=learn_weight_scales)
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().float().clone())
        self.register_buffer("pre_quant_scale", None if smooth is None else smooth.detach().float().clone())
        self.act = layer.act
        self.backend = layer.backend
        self.group_selector = layer.group_selector
        self.log_input_scale = None
        self.register_buffer("input_scale0", None)
        if self.act == "static":
            if layer.input_scale is None:
                raise OctetError("A static layer has no input_scale: quantize the MODEL with a CALIBRATION first.")
            self.input_scale0 = layer.input_scale.detach().float().clone()
            self.log_input_scale = nn.Parameter(torch.zeros_like(self.input_scale0), requires_grad=learn_act_scales)
        self.rank = rank
        n, k = latent.shape[0], latent[0].numel()
        if rank > 0:
            # B = 0: the twin starts exactly at the PTQ model; A like nn.Linear's default init.
            # Drawn from ``generator`` (make_twins seeds it from QATConfig.seed): the global RNG would make
            # a run depend on whatever drew before it (a test suite's order changed a QAT result).
            a = torch.empty(rank, k)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
            a = a.to(device)
            self.lora_a = nn.Parameter(a)
            self.lora_b = nn.Parameter(torch.zeros(n, rank, device=device))
        else:
            self.lora_a = self.lora_b = None

    # -- the quantities the kernels will see -----------------------------------------------------
    def weight_scale(self) -> torch.Tensor:
        return self.weight_scale0 * self.log_weight_scale.exp()

    def input_scale(self) -> Optional[torch.Tensor]:
        return None if self.log_input_scale is None else self.input_scale0 * self.log_input_scale.exp()

    def merged_weight(self) -> torch.Tensor:
        w = self.latent_weight.float()
        if self.lora_a is not None:
            w = w + (self.lora_b @ self.lora_a).reshape(w.shape)
        return w

    def fake_weight(self) -> torch.Tensor:
        w = self.merged_weight()
        scale = self.weight_scale().reshape((-1,) + (1,) * (w.dim() - 1))
        return fake_quant(w, scale, self.qmax)

    def _static_scale(self) -> Optional[torch.Tensor]:
        scales = self.input_scale()
        if scales is None:
            return None
        group = 0 if self.group_selector is None or scales.numel() == 1 else self.group_selector.index
        return scales[group]

    def fake_input(self, x: torch.Tensor) -> torch.Tensor:
        xs = x.float()
        if self.pre_quant_scale is not None:
            shape = [1] * xs.dim()
            shape[-1 if not self.is_conv else 1] = -1
            xs = xs / self.pre_quant_scale.reshape(shape)
        if self.act == "none":
            return xs
        return _quantize_input(xs, self.is_conv, self._static_scale())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.fake_weight()
        return self._op(self.fake_input(x), w, self.bias).to(x.dtype)

    def trainable(self) -> dict[str, list[nn.Parameter]]:
        scales = [p for p in (self.log_weight_scale, self.log_input_scale) if p is not None and p.requires_grad]
        lora = [p for p in (self.lora_a, self.lora_b) if p is not None]
        return {"scales": scales, "lora": lora}

    # -- back to a real INT8 layer -----------------------------------------------------------------
    @torch.no_grad()
    def fold(self) -> QuantLayer:
        """A real QuantLayer: LoRA merged, weight re-quantized with the learned scales."""
        w = self.merged_weight()
        scale = self.weight_scale().float().reshape(-1, 1).clamp_min(MIN_SCALE)
        view = scale.reshape((-1,) + (1,) * (w.dim() - 1))
        qweight = torch.round(w / view).clamp_(-self.qmax, self.qmax).to(torch.int8)
        layer = self._quant_layer(qweight, scale.clone())
        if self.pre_quant_scale is not None:
            layer.set_smoothing(self.pre_quant_scale)
        if self.log_input_scale is not None:
            layer.set_static_scales(self.input_scale().clamp_min(MIN_SCALE), self.group_selector)
        return layer


class FakeQuantLinear(FakeQuantLayer):
    def _op(self, x, w, b):
        return F.linear(x, w, b)

    def _quant_layer(self, qweight, scale):
        return QuantLinear(qweight, scale, self.bias, self.act, self.backend)


class FakeQuantConv2d(FakeQuantLayer):
    is_conv = True

    def __init__(self, layer: QuantConv2d, *args, **kwargs):
        super().__init__(layer, *args, **kwargs)
        self.stride, self.padding, self.dilation, self.groups = layer.stride, layer.padding, layer.dilation, layer.groups

    def _op(self, x, w, b):
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def _quant_layer(self, qweight, scale):
        return QuantConv2d(qweight, scale, self.bias, self.act, self.backend, stride=self.stride,
                           padding=self.padding, dilation=self.dilation, groups=self.groups)


def fake_quant_twin(layer: QuantLayer, float_weight: Optional[torch.Tensor] = None, rank: int = 0,
                    weight_bits: int = 8, learn_weight_scales: bool = True,
                    learn_act_scales: bool = True, generator: Optional[torch.Generator] = None) -> FakeQuantLayer:
    cls = {QuantLinear: FakeQuantLinear, QuantConv2d: FakeQuantConv2d}.get(type(layer))
    if cls is None:
        raise OctetError(f"No fake-quant twin for {type(layer).__name__}; QAT handles QuantLinear and QuantConv2d.")
    return cls(layer, float_weight, rank, weight_bits, learn_weight_scales, learn_act_scales, generator)


def make_twins(layers: dict[str, QuantLayer], float_model: Optional[nn.Module], config: QATConfig,
               device: Optional[torch.device] = None) -> dict[str, FakeQuantLayer]:
    """Twins for the given quantized layers; float weights are looked up by name in ``float_model``."""
    float_modules = dict(float_model.named_modules()) if float_model is not None else {}
    twins = {}
    g = torch.Generator().manual_seed(config.seed)   # LoRA init: reproducible whatever ran before
    with torch.inference_mode(False):
        for name, layer in layers.items():
            fm = float_modules.get(name)
            fw = getattr(fm, "weight", None) if fm is not None and not isinstance(fm, QuantLayer) else None
            twin = fake_quant_twin(layer, fw, config.lora_rank, config.weight_bits, config.learn_weight_scales,
                                   config.learn_act_scales, g)
            twins[name] = twin.to(device) if device is not None else twin
    return twins


def fold(twins: dict[str, FakeQuantLayer], device: Optional[torch.device] = None) -> dict[str, QuantLayer]:
    out = {}
    for name, twin in twins.items():
        layer = twin.fold()
        out[name] = layer.to(device) if device is not None else layer
    return out


def requantize(layers: dict[str, QuantLayer], float_model: nn.Module, weight_bits: int) -> dict[str, QuantLayer]:
    """PTQ at another weight width: the same layers (act mode, static scales, smoothing) with
    round-to-nearest ``weight_bits`` weights. The baseline QAT at that width is compared against."""
    cfg = QATConfig(lora_rank=0, weight_bits=weight_bits)
    return fold(make_twins(layers, float_model, cfg))


# -- the teacher --------------------------------------------------------------------------------------
def _map_tensors(obj, fn):
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(v, fn) for v in obj)
    return obj  # anything else (patch lists, callables) is passed through by reference


@dataclass
class TeacherCall:
    """One denoiser call of the float model: its inputs as given and the output it produced."""
    args: tuple
    kwargs: dict
    target: torch.Tensor
    sigma: Optional[float] = None


def _snapshot_saved_tensors():
    """Host models update residual streams in place (ComfyUI's Flux: ``img += ...``) after a norm has
    saved that tensor for backward, which autograd refuses. Saving a copy instead makes any host
    model trainable at the cost of the saved activations' memory (one call's graph at a time)."""
    return torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t)


@dataclass
class Teacher:
    calls: list[TeacherCall] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        total = 0

        def count(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t
        for c in self.calls:
            _map_tensors((c.args, c.kwargs, c.target), count)
        return total


@contextlib.contextmanager
def record_teacher(model: nn.Module, storage: torch.device = torch.device("cpu"),
                   sigma_of: Optional[Callable[[tuple, dict], object]] = None) -> Iterator[Teacher]:
    """Record every forward call of ``model`` (inputs and output, copied to ``storage``).

    Whatever drives the model - a host sampler, a test loop - is the trajectory; the hook is
    removed on exit, also after an error. ``sigma_of(args, kwargs)`` tells the noise level of a
    call, which static layers with timestep groups need to pick their scale while training.
    """
    teacher = Teacher()

    def keep(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(storage, copy=True)

    def hook(module, args, kwargs, output):
        sigma = sigma_of(args, kwargs) if sigma_of is not None else None
        if isinstance(sigma, torch.Tensor):
            sigma = float(sigma.detach().float().max())
        teacher.calls.append(TeacherCall(_map_tensors(args, keep), _map_tensors(kwargs, keep), keep(output), sigma))

    handle = model.register_forward_hook(hook, with_kwargs=True)
    try:
        yield teacher
    finally:
        handle.remove()


# -- training -----------------------------------------------------------------------------------------
@contextlib.contextmanager
def _autograd_ready(model: nn.Module) -> Iterator[None]:
    """Stand in normal copies for the frozen tensors that are inference tensors, for the duration.

    ComfyUI loads models inside ``torch.inference_mode``; autograd cannot save such tensors, yet a
    frozen GroupNorm or float layer must save its weight to pass gradients to the layers before it.
    Only those tensors are copied (norms and the layers a policy kept in float: small), and the
    originals are put back on exit.
    """
    replaced = []
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for key, t in list(store.items()):
                if t is not None and t.is_inference():
                    copy = t.detach().clone()
                    store[key] = nn.Parameter(copy, requires_grad=False) if isinstance(t, nn.Parameter) else copy
                    replaced.append((store, key, t))
    try:
        yield
    finally:
        for store, key, t in replaced:
            store[key] = t


@dataclass
class DistillResult:
    losses: list[float]                  # training loss per step
    eval_before: float                   # mean MSE vs teacher on the eval calls, before training
    eval_after: float
    seconds: float
    log: list[str]

    def text(self) -> str:
        return "\n".join(self.log)

    @property
    def improved(self) -> bool:
        """Keep the trained layers only if the held-back error went down (NaN counts as no)."""
        return bool(self.eval_after < self.eval_before)


def _call(model, call: TeacherCall, device, dtype):
    def to_dev(t):
        t = t.to(device).clone()  # clone: a normal tensor even if recorded under inference mode
        return t.to(dtype) if t.is_floating_point() and dtype is not None else t
    args, kwargs = _map_tensors(call.args, to_dev), _map_tensors(call.kwargs, to_dev)
    return model(*args, **kwargs)


def _loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # copy=True: a normal tensor even if the target was recorded under inference mode.
    return F.mse_loss(out.float(), target.to(out.device, torch.float32, copy=True))


def _score(model, calls, device, dtype, select) -> float:
    if not calls:
        return float("nan")
    with torch.no_grad():
        total = 0.0
        for c in calls:
            select(c)
            total += float(_loss(_call(model, c, device, dtype), c.target))
    return total / len(calls)


def distill(model: nn.Module, twins: dict[str, FakeQuantLayer], teacher: Teacher, config: QATConfig,
            device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None,
            progress: Optional[Callable[[int, int, float], None]] = None,
            holdout: Optional[Teacher] = None) -> DistillResult:
    """Train the twins (swapped into ``model``) to reproduce the teacher's outputs.

    ``model`` is the float denoiser whose recorded calls ``teacher`` holds; its own layers are
    frozen and it is returned unchanged. ``progress(step, steps, loss)`` is called after each step.
    ``eval_before`` / ``eval_after`` are measured on calls the training never sees: ``holdout``'s (a
    trajectory at other seeds / prompts), else ``config.eval_calls`` calls set aside from ``teacher``.
    A score on the training calls would reward over-fitting (issue 15: +1.4 dB claimed, images worse).
    """
    if not teacher.calls:
        raise OctetError("The teacher recorded no denoiser calls: sample at least one step with the float MODEL.")
    if not twins:
        raise OctetError("No quantized layers to fine-tune: connect a MODEL from Quantize Model.")
    start = time.perf_counter()
    g = torch.Generator().manual_seed(config.seed)
    if holdout is not None and holdout.calls:
        pick = torch.randperm(len(holdout.calls), generator=g)[:config.eval_calls].tolist()
        eval_calls, train_calls = [holdout.calls[i] for i in sorted(pick)], list(teacher.calls)
        held = f"{len(eval_calls)} calls of the held-back trajectory"
    else:
        # Hold back at most half of the calls, so a short teacher still leaves calls to train on.
        n_eval = min(config.eval_calls, len(teacher.calls) // 2)
        eval_idx = set(torch.randperm(len(teacher.calls), generator=g)[:n_eval].tolist())
        eval_calls = [c for i, c in enumerate(teacher.calls) if i in eval_idx]
        train_calls = [c for i, c in enumerate(teacher.calls) if i not in eval_idx]
        held = f"{len(eval_calls)} teacher calls set aside from training"
    selectors = {id(t.group_selector): t.group_selector for t in twins.values() if t.group_selector is not None}

    def select(call: TeacherCall):
        if call.sigma is not None:
            for s in selectors.values():
                s.select(call.sigma)

    log = [f"QAT: {len(twins)} layers, {len(teacher.calls)} teacher calls "
           f"({teacher.nbytes / 2**20:.1f} MiB), {config.steps} steps, lr {config.lr:g}, "
           f"LoRA rank {config.lora_rank}, weight bits {config.weight_bits}"]
    losses: list[float] = []
    with torch.inference_mode(False), torch.enable_grad(), swapped(model, twins), _autograd_ready(model):
        was_training = model.training
        model.eval()  # no dropout: the teacher ran in eval mode too
        frozen = [p for p in model.parameters() if p.requires_grad]
        try:
            for p in frozen:
                p.requires_grad_(False)
            groups = {"scales": [], "lora": []}
            for t in twins.values():
                for k, ps in t.trainable().items():
                    for p in ps:
                        p.requires_grad_(True)
                    groups[k] += ps
            param_groups = [{"params": groups["scales"], "lr": config.lr},
                            {"params": groups["lora"], "lr": config.lora_lr or config.lr}]
            param_groups = [pg for pg in param_groups if pg["params"]]
            eval_before = _score(model, eval_calls, device, dtype, select)
            log.append(f"held-back MSE before ({held}): {eval_before:.6g}")
            if param_groups and config.steps:
                opt = torch.optim.Adam(param_groups)
                # Cosine decay to 10%: large early steps find the scales, small late steps settle rounding.
                sched = torch.optim.lr_scheduler.LambdaLR(
                    opt, lambda i: 0.1 + 0.45 * (1 + math.cos(math.pi * min(i, config.steps) / config.steps)))
                order = torch.randint(len(train_calls), (config.steps,), generator=g).tolist()
                running = None
                for step, i in enumerate(order, 1):
                    call = train_calls[i]
                    select(call)
                    with _snapshot_saved_tensors():
                        loss = _loss(_call(model, call, device, dtype), call.target)
                    if not torch.isfinite(loss):
                        raise OctetError(f"QAT loss became {float(loss)} at step {step}: lower the learning rate.")
                    opt.zero_grad(set_to_none=True)
                    loss.backward()  # the graph of this one call is freed here
                    opt.step()
                    sched.step()
                    value = float(loss.detach())
                    losses.append(value)
                    running = value if running is None else 0.9 * running + 0.1 * value
                    if step % max(1, config.log_every) == 0 or step == config.steps:
                        log.append(f"step {step}/{config.steps}: loss {value:.6g} (avg {running:.6g})")
                    if progress is not None:
                        progress(step, config.steps, value)
            for t in twins.values():
                for ps in t.trainable().values():
                    for p in ps:
                        p.requires_grad_(False)
            eval_after = _score(model, eval_calls, device, dtype, select)
        finally:
            for p in frozen:
                p.requires_grad_(True)
            model.train(was_training)
    seconds = time.perf_counter() - start
    log.append(f"held-back MSE after: {eval_after:.6g} ({_db(eval_before, eval_after):+.2f} dB, denoiser-output "
               f"proxy on calls not trained on) in {seconds:.1f} s")
    return DistillResult(losses, eval_before, eval_after, seconds, log)


def _db(before: float, after: float) -> float:
    if not (before > 0 and after > 0):
        return float("nan")
    return 10 * math.log10(before / after)
