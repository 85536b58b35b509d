"""octet.metrics on inputs whose answers are known by hand."""
import math

import numpy as np
import pytest
import torch

from comfyui_octet.octet import metrics


def test_psnr_of_known_noise(rng):
    x = torch.rand(3, 1, 16, 16, generator=rng) * 0.8 + 0.1
    d = 0.01
    sign = torch.where(torch.rand(x.shape, generator=rng) < 0.5, -1.0, 1.0)
    p = metrics.psnr(x, x + d * sign)  # MSE is exactly d^2
    assert torch.allclose(p, torch.full((3,), 10 * math.log10(1 / d ** 2), dtype=torch.float64), atol=1e-6)
    assert metrics.psnr(x, x, data_range=1.0).isinf().all()
    assert torch.allclose(metrics.psnr(2 * x, 2 * x + 2 * d * sign, data_range=2.0), p)


def test_ssim_identity_and_constant_images(rng):
    x = torch.rand(2, 3, 24, 24, generator=rng)
    assert torch.allclose(metrics.ssim(x, x), torch.ones(2, dtype=torch.float64))
    # Constant images: variances and covariance are 0, so SSIM = (2ab + C1) / (a^2 + b^2 + C1) exactly.
    a, b = 0.25, 0.75  # exact in float32
    c1 = (0.01 * 1.0) ** 2
    s = metrics.ssim(torch.full((1, 1, 16, 16), a), torch.full((1, 1, 16, 16), b))
    assert s.item() == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-9)


def test_ssim_matches_a_hand_computation(rng):
    from scipy.signal import correlate2d
    x = torch.rand(1, 1, 20, 20, generator=rng)
    y = (x + 0.1 * torch.randn(x.shape, generator=rng)).clamp(0, 1)
    w = metrics.gaussian_window().numpy()
    a, b = x[0, 0].double().numpy(), y[0, 0].double().numpy()

    def f(t):
        return correlate2d(t, w, mode="valid")
    mu_a, mu_b = f(a), f(b)
    va, vb, cov = f(a * a) - mu_a ** 2, f(b * b) - mu_b ** 2, f(a * b) - mu_a * mu_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    ref = (((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (va + vb + c2))).mean()
    assert metrics.ssim(x, y).item() == pytest.approx(ref, rel=1e-9)
    assert metrics.ssim(x, y).item() < 1.0


def test_fid_known_values(rng):
    f = torch.randn(500, 8, generator=rng, dtype=torch.float64)
    assert metrics.fid(f, f) == pytest.approx(0.0, abs=1e-6)
    # Diagonal Gaussians: FID = |mu1 - mu2|^2 + sum (sqrt(v1) - sqrt(v2))^2
    mu1, mu2 = np.zeros(3), np.array([1.0, 2.0, 0.0])
    v1, v2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 4.0, 1.0])
    want = 5.0 + (1 - 2) ** 2 + 0 + (3 - 1) ** 2
    assert metrics.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(want, rel=1e-9)
    shifted = f + torch.tensor([3.0] + [0.0] * 7, dtype=torch.float64)
    assert metrics.fid(f, shifted) == pytest.approx(9.0, rel=1e-6)


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match="same shape"):
        metrics.psnr(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 5))
    with pytest.raises(ValueError, match="smaller than"):
        metrics.ssim(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8))


def test_timing_and_memory_helpers():
    assert metrics.time_call(lambda: sum(range(1000)), repeat=3) >= 0
    out, peak = metrics.peak_memory(lambda: torch.ones(4096, 4096).sum())
    assert out.item() == 4096 * 4096 and peak.kind == "cpu_rss_sampled" and peak.bytes >= 0


def test_tensor_psnr_peaks_and_identity():
    from comfyui_octet.octet.metrics import tensor_psnr
    ref = torch.tensor([0.0, 2.0, -2.0, 1.0])
    x = ref + torch.tensor([0.1, -0.1, 0.1, -0.1])
    # mse = 0.01: range peak 4 -> 10*log10(16/0.01) = 32.04 dB; absmax peak 2 -> 26.02 dB
    assert abs(tensor_psnr(ref, x) - 32.0412) < 1e-3
    assert abs(tensor_psnr(ref, x, peak="absmax") - 26.0206) < 1e-3
    assert tensor_psnr(ref, ref.clone()) == float("inf")
