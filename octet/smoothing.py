"""SmoothQuant: move activation outliers into the weights, per input channel.

For a layer y = x W^T, dividing input channel j by s_j and multiplying weight column j by s_j
leaves y unchanged: (x / s) (W * s)^T = x W^T. Choosing s_j = max|X_j|^a / max|W_j|^(1-a)
(Xiao et al., 2023) flattens channels whose activations are far larger than the rest, so one
per-tensor activation scale wastes less resolution; alpha moves difficulty between the two.

Octet folds s into the int8 weights offline (``QuantLayer.from_float(smooth=...)``) and divides
by s inside the activation quantizer at run time (``pre_quant_scale``, the host's key name). In a
checkpoint nothing else is needed to run the layer.
"""
from __future__ import annotations

import torch

# Factors are clamped so that a dead channel (max|X_j| = 0) or a zero weight column cannot
# produce 0 or inf: channels quieter than this fraction of the loudest are treated as that quiet.
RELATIVE_FLOOR = 1e-5
FACTOR_RANGE = (1e-4, 1e4)


def weight_channel_absmax(weight: torch.Tensor) -> torch.Tensor:
    """max |W[:, j]| per input channel j, for Linear [N, K] and Conv2d [O, K, kh, kw] weights."""
    w = weight.detach().float().abs()
    if w.dim() == 2:
        return w.amax(dim=0)
    return w.amax(dim=(0, 2, 3))


def factors(act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant divisors s [K] for one layer (float32, finite, positive)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha} must be in [0, 1]")
    a = act_absmax.detach().float().reshape(-1)
    w = weight_channel_absmax(weight)
    if a.numel() != w.numel():
        raise ValueError(f"activation statistics have {a.numel()} channels but the weight has {w.numel()} "
                         f"input channels")
    a = a.clamp_min(float(a.max()) * RELATIVE_FLOOR + 1e-30)
    w = w.clamp_min(float(w.max()) * RELATIVE_FLOOR + 1e-30)
    s = a.pow(alpha) / w.pow(1.0 - alpha)
    return s.clamp(*FACTOR_RANGE)
