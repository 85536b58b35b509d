"""Distillation: train the fake-quant twins, swapped into the float model, towards the teacher.

The loss is the MSE between student and teacher outputs on one recorded denoiser call per step, so
the autograd graph never spans more than one call (bounded memory). Every other layer stays frozen.
The error before and after is scored on calls the training never sees.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..api import OctetError, swapped
from ..metrics import db_gain
from .config import QATConfig
from .fake_quant import FakeQuantLayer
from .teacher import Teacher, TeacherCall, map_tensors


def _snapshot_saved_tensors():
    """Host models update residual streams in place (ComfyUI's Flux: ``img += ...``) after a norm has
    saved that tensor for backward, which autograd refuses. Saving a copy instead makes any host
    model trainable at the cost of the saved activations' memory (one call's graph at a time)."""
    return torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t)


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
    args, kwargs = map_tensors(call.args, to_dev), map_tensors(call.kwargs, to_dev)
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
    log.append(f"held-back MSE after: {eval_after:.6g} ({db_gain(eval_before, eval_after):+.2f} dB, denoiser-output "
               f"proxy on calls not trained on) in {seconds:.1f} s")
    return DistillResult(losses, eval_before, eval_after, seconds, log)
