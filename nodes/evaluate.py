"""Evaluate and Profile logic (used by eval_nodes.py and bench/quality.py): sample FP and INT8 MODELs
through the host's KSampler (``sampling.ksampler``) at the same seeds, compare images, time and size
them, draw charts.

Images: Octet reference models decode exactly (pixel-shuffle); other models need a VAE, and without
one we compare latents mapped to [0, 1] with the FP batch's range (labelled "latent space").
FID uses our Fashion-MNIST classifier's features, so it is computed for the reference models only.
"""
from __future__ import annotations

import dataclasses
import os
import time

import torch

from ..octet import metrics
from ..fixtures import reference_model
from .plotting import bar_chart
from .sampling import ksampler

FID_MIN_SAMPLES = 16
CLASSIFIER_PATH = os.path.join(reference_model.MODELS_DIR, "octet_fmnist_classifier.safetensors")
_classifier = None


def classifier():
    """The shipped FID feature network (loaded once)."""
    global _classifier
    if _classifier is None:
        from ..fixtures.feature_net import load_classifier
        _classifier = load_classifier(CLASSIFIER_PATH)
    return _classifier


def is_reference(model) -> bool:
    return "octet_reference" in getattr(model, "model_options", {})


@dataclasses.dataclass
class SampleRun:
    latents: torch.Tensor
    seconds: float
    steps: int
    peak: metrics.PeakMemory
    size_bytes: int

    @property
    def ms_per_step(self) -> float:
        return 1000 * self.seconds / max(self.steps, 1)


def sample_run(model, positive, negative, latent, seed, steps, cfg, sampler_name, scheduler) -> SampleRun:
    """One KSampler run (``sampling.ksampler``), timed, with peak memory."""
    import comfy.model_management as mm

    device = mm.get_torch_device()
    t0 = time.perf_counter()
    out, peak = metrics.peak_memory(
        lambda: ksampler(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent)["samples"],
        device=device)
    seconds = time.perf_counter() - t0
    return SampleRun(out, seconds, steps, peak, int(model.model_size()))


def to_images(model, latents: torch.Tensor, vae=None, ref_range=None) -> tuple[torch.Tensor, str]:
    """[B, C, H, W] images in [0, 1] and a word for the space they live in."""
    if is_reference(model):
        return reference_model.decode(model, latents), "pixels"
    if vae is not None:
        return vae.decode(latents).movedim(-1, 1).clamp(0, 1).float(), "pixels (VAE)"
    lo, hi = ref_range if ref_range is not None else (latents.amin(), latents.amax())
    return ((latents.float() - lo) / (hi - lo + 1e-8)).clamp(0, 1), "latent space"


def compare(ref_images: torch.Tensor, images: torch.Tensor, fid_features: bool) -> dict:
    """PSNR / SSIM of each image vs its FP twin (same seed), FID between the two sets (classifier features)."""
    out = {"psnr": metrics.finite_mean(metrics.psnr(ref_images, images)),
           "ssim": float(metrics.ssim(ref_images, images).mean()) if min(images.shape[-2:]) >= 11 else None,
           "fid": None, "n": images.shape[0]}
    if fid_features and images.shape[0] >= FID_MIN_SAMPLES:
        net, _ = classifier()
        with torch.no_grad():
            out["fid"] = metrics.fid(net.features(ref_images.float()), net.features(images.float()))
    return out


# ---- profiling ------------------------------------------------------------------------------

@torch.no_grad()
def profile_step(model, positive, negative, latent, seed=0, cfg=1.0, sampler_name="euler", scheduler="normal",
                 top: int = 20):
    """Per-module time and memory of one sampling step of ``model`` (through the host's KSampler).

    Time is *self* time (a module's wall time minus its children's), so attention math shows up on the
    attention module and nothing is counted twice. Memory: parameter bytes (int8 for quantized layers)
    and the bytes of the module's output activations; on CUDA also the allocator's peak growth inside.
    Returns (rows sorted by self time, text table, bar-chart IMAGE).
    """
    import comfy.model_management as mm

    from . import bridge
    device = mm.get_torch_device()
    cuda = device.type == "cuda"
    run = lambda: ksampler(model, seed, 1, cfg, sampler_name, scheduler, positive, negative, latent)  # noqa: E731
    run()  # warm up; also loads the MODEL, so a quantized clone's layers are swapped in
    dm = bridge.diffusion_model(model)
    stats, stack, hooks = {}, [], []

    def pre(name):
        def fn(mod, args):
            if cuda:
                torch.cuda.synchronize(device)
            stack.append((name, time.perf_counter(), torch.cuda.memory_allocated(device) if cuda else 0))
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
        return fn

    def post(name):
        def fn(mod, args, out):
            if cuda:
                torch.cuda.synchronize(device)
            _, t0, m0 = stack.pop()
            dt = time.perf_counter() - t0
            s = stats.setdefault(name, {"time": 0.0, "child": 0.0, "calls": 0, "out_bytes": 0, "peak": 0})
            s["time"] += dt
            s["calls"] += 1
            outs = out if isinstance(out, (tuple, list)) else (out,)
            s["out_bytes"] = max(s["out_bytes"], sum(o.numel() * o.element_size() for o in outs
                                                     if isinstance(o, torch.Tensor)))
            if cuda:
                s["peak"] = max(s["peak"], torch.cuda.max_memory_allocated(device) - m0)
            if stack:
                parent = stats.setdefault(stack[-1][0], {"time": 0.0, "child": 0.0, "calls": 0, "out_bytes": 0,
                                                         "peak": 0})
                parent["child"] += dt
        return fn

    for name, m in dm.named_modules():
        if name:
            hooks += [m.register_forward_pre_hook(pre(name)), m.register_forward_hook(post(name))]
    try:
        t0 = time.perf_counter()
        run()
        total = time.perf_counter() - t0
    finally:
        for h in hooks:
            h.remove()
    mods = dict(dm.named_modules())
    rows = []
    for name, s in stats.items():
        m = mods.get(name)
        params = sum(t.numel() * t.element_size() for t in m.state_dict().values()) if m is not None and \
            not list(m.children()) else 0
        rows.append({"layer": name, "type": type(m).__name__ if m is not None else "?", "calls": s["calls"],
                     "self_ms": 1000 * max(s["time"] - s["child"], 0.0), "param_bytes": params,
                     "out_bytes": s["out_bytes"], "cuda_peak_bytes": s["peak"] if cuda else None})
    rows.sort(key=lambda r: -r["self_ms"])
    hooked = sum(r["self_ms"] for r in rows)
    lines = [f"One sampling step (cfg {cfg}: {'2' if cfg != 1.0 else '1'} model call(s)), {total * 1000:.1f} ms wall, "
             f"{hooked:.1f} ms inside modules; device {device}.",
             f"{'layer':<48} {'type':<20} {'calls':>5} {'self ms':>8} {'%':>5} {'params KiB':>10} {'out KiB':>8}"]
    for r in rows[:top]:
        lines.append(f"{r['layer'][-48:]:<48} {r['type'][:20]:<20} {r['calls']:>5} {r['self_ms']:>8.2f} "
                     f"{100 * r['self_ms'] / max(hooked, 1e-9):>5.1f} {r['param_bytes'] / 1024:>10.1f} "
                     f"{r['out_bytes'] / 1024:>8.1f}")
    chart = bar_chart([(r["layer"], r["self_ms"]) for r in rows[:top]], "self time per layer, one step", "ms")
    return rows, "\n".join(lines), chart
