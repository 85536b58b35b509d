"""Evaluate and Profile logic (used by eval_nodes.py and bench/quality.py): sample FP and INT8 MODELs
through the host's KSampler at the same seeds, compare images, time and size them, draw charts.

Images: Octet reference models decode exactly (pixel-shuffle); other models need a VAE, and without
one we compare latents mapped to [0, 1] with the FP batch's range (labelled "latent space").
FID uses our Fashion-MNIST classifier's features, so it is computed for the reference models only.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time

import torch

from ..octet import metrics
from . import reference_model

FID_MIN_SAMPLES = 16
CLASSIFIER_PATH = os.path.join(reference_model.MODELS_DIR, "octet_fmnist_classifier.safetensors")
_classifier = None


def classifier():
    """The shipped FID feature network (loaded once)."""
    global _classifier
    if _classifier is None:
        from ..octet.feature_net import load_classifier
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
    """One KSampler run (the host's common_ksampler), timed, with peak memory."""
    import comfy.model_management as mm
    import nodes

    device = mm.get_torch_device()
    t0 = time.perf_counter()
    out, peak = metrics.peak_memory(
        lambda: nodes.common_ksampler(model, seed, steps, cfg, sampler_name, scheduler, positive, negative,
                                      latent)[0]["samples"], device=device)
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


# ---- drawing (PIL only: matplotlib is not a dependency) -------------------------------------

def _font():
    from PIL import ImageFont
    return ImageFont.load_default()


def grid(columns: list[torch.Tensor], labels: list[str], max_rows: int = 8, scale: int = 3) -> torch.Tensor:
    """Side-by-side grid: one column per model, one row per seed. Returns a ComfyUI IMAGE [1, H, W, 3]."""
    from PIL import Image, ImageDraw
    cols = [c[:max_rows].float().clamp(0, 1) for c in columns]
    n, _, h, w = cols[0].shape
    h, w = h * scale, w * scale
    head = 14
    canvas = Image.new("RGB", (len(cols) * (w + 4), head + n * (h + 4)), "white")
    draw = ImageDraw.Draw(canvas)
    for j, (c, label) in enumerate(zip(cols, labels)):
        draw.text((j * (w + 4) + 2, 1), label[: max(4, w // 6)], fill="black", font=_font())
        for i in range(n):
            img = c[i]
            img = img.repeat(3, 1, 1) if img.shape[0] == 1 else img[:3]
            arr = (img.permute(1, 2, 0) * 255).round().byte().numpy()
            tile = Image.fromarray(arr).resize((w, h), Image.NEAREST)
            canvas.paste(tile, (j * (w + 4), head + i * (h + 4)))
    return pil_to_image(canvas)


def pil_to_image(img) -> torch.Tensor:
    import numpy as np
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0)[None]


def quality_speed_size_chart(points: list[dict], title: str = "quality vs speed vs size") -> torch.Tensor:
    """Scatter of measured numbers: x = ms per sampling step, y = PSNR vs FP (dB; FP drawn at the top),
    disc area proportional to model size. Each point: {label, ms_per_step, psnr, size_mb}."""
    from PIL import Image, ImageDraw
    W, H, L, R, T, B = 560, 360, 60, 20, 30, 40
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    finite = [p["psnr"] for p in points if p["psnr"] is not None and math.isfinite(p["psnr"])]
    y_lo = min(finite) - 3 if finite else 0.0
    y_hi = (max(finite) + 6) if finite else 60.0
    xs = [p["ms_per_step"] for p in points]
    x_lo, x_hi = 0.0, max(xs) * 1.15 if xs else 1.0
    max_mb = max(p["size_mb"] for p in points) or 1.0

    def pos(x, y):
        return L + (x - x_lo) / (x_hi - x_lo) * (W - L - R), T + (1 - (y - y_lo) / (y_hi - y_lo)) * (H - T - B)

    d.rectangle([L, T, W - R, H - B], outline="black")
    for k in range(5):
        yv = y_lo + k * (y_hi - y_lo) / 4
        _, py = pos(x_lo, yv)
        d.text((4, py - 5), f"{yv:.1f}", fill="black", font=_font())
        xv = x_lo + k * (x_hi - x_lo) / 4
        px, _ = pos(xv, y_lo)
        d.text((px - 10, H - B + 4), f"{xv:.0f}", fill="black", font=_font())
    d.text((W // 2 - 60, H - 16), "ms per sampling step", fill="black", font=_font())
    d.text((4, 12), "PSNR vs FP (dB); disc area = size", fill="black", font=_font())
    d.text((W // 2, 4), title, fill="black", font=_font())
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]
    for i, p in enumerate(points):
        y = p["psnr"] if p["psnr"] is not None and math.isfinite(p["psnr"]) else y_hi - 1.5
        px, py = pos(p["ms_per_step"], y)
        r = 4 + 14 * math.sqrt(p["size_mb"] / max_mb)
        d.ellipse([px - r, py - r, px + r, py + r], outline=palette[i % len(palette)], width=2)
        psnr_txt = "ref" if not (p["psnr"] is not None and math.isfinite(p["psnr"])) else f"{p['psnr']:.1f}dB"
        d.text((px + r + 2, py - 6), f"{p['label']} {psnr_txt} {p['size_mb']:.1f}MB", fill=palette[i % len(palette)],
               font=_font())
    return pil_to_image(img)


def bar_chart(rows: list[tuple[str, float]], title: str, unit: str) -> torch.Tensor:
    from PIL import Image, ImageDraw
    rows = rows[:24]
    W, row_h, label_w = 640, 16, 300
    H = 24 + row_h * max(len(rows), 1) + 8
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    d.text((4, 4), title, fill="black", font=_font())
    top = max((v for _, v in rows), default=1.0) or 1.0
    for i, (name, v) in enumerate(rows):
        y = 24 + i * row_h
        d.text((4, y + 2), name[-48:], fill="black", font=_font())
        d.rectangle([label_w, y + 2, label_w + (W - label_w - 90) * v / top, y + row_h - 3], fill="#1f77b4")
        d.text((W - 84, y + 2), f"{v:.3g} {unit}", fill="black", font=_font())
    return pil_to_image(img)


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
    import nodes

    from . import bridge
    device = mm.get_torch_device()
    cuda = device.type == "cuda"
    run = lambda: nodes.common_ksampler(model, seed, 1, cfg, sampler_name, scheduler, positive, negative,  # noqa: E731
                                        latent)
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
