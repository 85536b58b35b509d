"""Image-fidelity and cost metrics: PSNR, SSIM, FID from features, timing and peak memory.

Pure torch/numpy, no ComfyUI. Images are float tensors [B, C, H, W] with a known ``data_range``
(1.0 for [0, 1] images). Quality is measured the way the INT8-diffusion literature does it
(SVDQuant, ViDiT-Q): the quantized model's images against the float model's at the same seed.
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

SSIM_K1, SSIM_K2 = 0.01, 0.03  # Wang et al. 2004
SSIM_WINDOW, SSIM_SIGMA = 11, 1.5


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"images must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dim() != 4:
        raise ValueError(f"images must be [B, C, H, W], got {a.dim()} dims")


def psnr(ref: torch.Tensor, x: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image PSNR in dB ([B]); identical images give +inf."""
    _check_pair(ref, x)
    mse = ((ref.double() - x.double()) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(data_range ** 2 / mse)


def psnr_from_mse(mse: float, peak: float) -> float:
    """PSNR in dB of an error with mean square ``mse`` against ``peak``: +inf when there is no error."""
    return math.inf if mse <= 0 else 10 * math.log10(peak ** 2 / mse)


def db_gain(before: float, after: float) -> float:
    """How far an error fell, in dB: 10 log10(before / after) (> 0: ``after`` is smaller); NaN unless both
    are positive (an error that vanished or was not measured has no ratio)."""
    if not (before > 0 and after > 0):
        return float("nan")
    return 10 * math.log10(before / after)


def tensor_psnr(ref: torch.Tensor, x: torch.Tensor, peak: str = "range") -> float:
    """PSNR in dB of a whole tensor (latents, model outputs), float: +inf when identical.
    ``peak``: "range" uses max - min of ``ref`` (latents have no fixed data range), "absmax" its |max|."""
    ref, x = ref.double(), x.double()
    mse = float(((ref - x) ** 2).mean())
    top = float(ref.max() - ref.min()) if peak == "range" else float(ref.abs().max())
    if peak not in ("range", "absmax"):
        raise ValueError(f"peak={peak!r}; expected 'range' or 'absmax'")
    return psnr_from_mse(mse, top)


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-coords ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(ref: torch.Tensor, x: torch.Tensor, data_range: float = 1.0, window: int = SSIM_WINDOW,
         sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """Per-image mean SSIM ([B]): gaussian window (11, sigma 1.5), K1=0.01, K2=0.03, 'valid' filtering,
    averaged over channels and positions (Wang et al. 2004)."""
    _check_pair(ref, x)
    if min(ref.shape[-2:]) < window:
        raise ValueError(f"images of {tuple(ref.shape[-2:])} are smaller than the {window}x{window} SSIM window")
    c = ref.shape[1]
    w = gaussian_window(window, sigma).to(ref.device).expand(c, 1, window, window)
    a, b = ref.double(), x.double()

    def filt(t):
        return F.conv2d(t, w, groups=c)

    mu_a, mu_b = filt(a), filt(b)
    var_a = filt(a * a) - mu_a ** 2
    var_b = filt(b * b) - mu_b ** 2
    cov = filt(a * b) - mu_a * mu_b
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1)


def feature_stats(features) -> tuple[np.ndarray, np.ndarray]:
    f = np.asarray(features.detach().cpu().double() if isinstance(features, torch.Tensor) else features,
                   dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be [N >= 2, D], got shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def _sqrtm_psd(c: np.ndarray) -> np.ndarray:
    vals, vecs = np.linalg.eigh((c + c.T) / 2)
    return (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """||mu1 - mu2||^2 + tr(C1 + C2 - 2 (C1 C2)^1/2), with tr (C1 C2)^1/2 = tr (C1^1/2 C2 C1^1/2)^1/2
    computed by symmetric eigendecompositions (stable for the rank-deficient covariances of few samples)."""
    s1 = _sqrtm_psd(cov1)
    m = s1 @ cov2 @ s1
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    d = float(((mu1 - mu2) ** 2).sum() + np.trace(cov1) + np.trace(cov2) - 2 * tr_sqrt)
    return max(d, 0.0)


def fid(features_a, features_b) -> float:
    """FID between two feature sets [N, D] (any feature network; numbers compare only within one)."""
    return frechet_distance(*feature_stats(features_a), *feature_stats(features_b))


# ---- cost helpers ---------------------------------------------------------------------------

def time_call(fn, repeat: int = 3, warmup: int = 1, device: torch.device | None = None) -> float:
    """Median wall time of ``fn()`` in seconds (synchronising CUDA when ``device`` is a GPU)."""
    sync = (lambda: torch.cuda.synchronize(device)) if device is not None and device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


@dataclass
class PeakMemory:
    bytes: int
    kind: str  # "cuda_allocated" | "cpu_rss_sampled"


def peak_memory(fn, device: torch.device | None = None, interval_s: float = 0.001):
    """Run ``fn()`` and return (its result, PeakMemory above the level before the call).

    CUDA: the allocator's exact peak. CPU: torch has no allocator statistics there, so the process
    RSS is sampled every ``interval_s`` in a thread; a coarse figure, labelled as such.
    """
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        torch.cuda.synchronize(device)
        return out, PeakMemory(torch.cuda.max_memory_allocated(device) - base, "cuda_allocated")
    import psutil
    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = [base]
    done = threading.Event()

    def sampler():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            done.wait(interval_s)

    th = threading.Thread(target=sampler, daemon=True)
    th.start()
    try:
        out = fn()
    finally:
        done.set()
        th.join()
    peak[0] = max(peak[0], proc.memory_info().rss)
    return out, PeakMemory(peak[0] - base, "cpu_rss_sampled")


def finite_mean(values) -> float:
    """Mean of per-image values, with identical images (inf PSNR) kept as inf only when all are."""
    v = [float(x) for x in values]
    finite = [x for x in v if math.isfinite(x)]
    return sum(finite) / len(finite) if finite else float("inf")
