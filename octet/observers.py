"""Activation statistics for static W8A8: what Calibrate records, per layer and per timestep group.

Per layer ``LayerStats`` keeps, for each timestep group g:
  * ``absmax[g]``            the exact largest |x| seen;
  * ``channel_absmax[g, K]`` the exact largest |x_j| per input channel (SmoothQuant needs it, and
                             it gives the exact absmax of the smoothed input for any smoothing);
  * ``hist[g, B]``           a histogram of |x| on log2-spaced bins (percentile and MSE clipping);
  * ``shape_hist[g, B]``     a histogram of |x_j| / a_j, with a_j the channel's absmax in the same
                             call: the within-channel shape, used to estimate the histogram of the
                             *smoothed* input (see ``smoothed_histogram``);
  * ``count[g]``, ``calls[g]`` values histogrammed and forward calls seen.

Why float-exponent bins: activation magnitudes span many octaves and the range is not known
before the first call, so fixed bins (16 per octave, from 2^-24 to 2^24; within an octave they are
evenly spaced, 3-6 % of the value wide) let histograms of different calls and groups simply add
up, with no re-binning. A value's bin is read straight from its float32 bits (exponent and top
four mantissa bits), about 7x cheaper than log2 + floor on CPU, which keeps calibration within
its time budget. Percentiles interpolate inside a bin, so they are accurate to a fraction of a
bin; absmax is exact.

Why a subsample: on big layers the histograms dominate the hook's cost, so each call bins at most
``sample_cap`` values (a fixed stride over tokens / pixels, all channels kept). Extremes are still
exact because absmax and channel absmax always see the whole tensor.
"""
from __future__ import annotations

import math

import torch

from ..kernels.torch_ref import QMAX, smoothed  # one definition of the int8 grid and of SmoothQuant's divide

BINS_PER_OCTAVE = 16
MIN_LOG2 = -24
MAX_LOG2 = 24
BINS = (MAX_LOG2 - MIN_LOG2) * BINS_PER_OCTAVE
DEFAULT_SAMPLE_CAP = 1 << 16


_MANTISSA_SHIFT = 23 - 4                        # keep exponent + 4 mantissa bits = 16 bins per octave
_FIRST_BIN = (127 + MIN_LOG2) * BINS_PER_OCTAVE  # biased exponent of 2^MIN_LOG2, in bins


def bin_edges() -> torch.Tensor:
    """The B+1 bin edges (float64): 2^o * (1 + j/16). Values below 2^-24 count in bin 0, above 2^24 in the last."""
    i = torch.arange(BINS + 1, dtype=torch.float64)
    octave, j = torch.div(i, BINS_PER_OCTAVE, rounding_mode="floor"), i % BINS_PER_OCTAVE
    return torch.exp2(MIN_LOG2 + octave) * (1 + j / BINS_PER_OCTAVE)


def bin_index(absx: torch.Tensor) -> torch.Tensor:
    """Bin of each non-negative float32 value, read from its bits; zeros and denormals fall in bin 0."""
    bits = absx.float().contiguous().view(torch.int32)
    return ((bits >> _MANTISSA_SHIFT) - _FIRST_BIN).clamp_(0, BINS - 1)


def histogram(absx: torch.Tensor) -> torch.Tensor:
    return torch.bincount(bin_index(absx.reshape(-1).float()), minlength=BINS)


def channels_last_2d(x: torch.Tensor, kind: str) -> torch.Tensor:
    """Activations as [rows, K] (a view for linear; a copy for conv). For tests and analysis."""
    if kind == "linear":
        return x.reshape(-1, x.shape[-1])
    return x.transpose(0, 1).reshape(x.shape[1], -1).t()


class LayerStats:
    """Running statistics of one layer's input, bucketed by timestep group."""

    def __init__(self, kind: str, channels: int, groups: int, sample_cap: int = DEFAULT_SAMPLE_CAP):
        if kind not in ("linear", "conv"):
            raise ValueError(f"kind={kind!r}; expected 'linear' or 'conv'")
        self.kind, self.channels, self.groups, self.sample_cap = kind, channels, groups, sample_cap
        self.absmax = torch.zeros(groups)
        self.channel_absmax = torch.zeros(groups, channels)
        self.hist = torch.zeros(groups, BINS, dtype=torch.int64)
        self.shape_hist = torch.zeros(groups, BINS, dtype=torch.int64)
        self.count = torch.zeros(groups, dtype=torch.int64)
        self.calls = torch.zeros(groups, dtype=torch.int64)

    # -- recording -----------------------------------------------------------------------------
    @torch.no_grad()
    def observe(self, x: torch.Tensor, group: int) -> None:
        """Add one forward call's input (Linear: [..., K]; Conv2d: [N, K, H, W])."""
        a = x.detach().abs()
        if self.kind == "linear":
            a = a.reshape(-1, a.shape[-1])                       # [M, K]
            chan = a.amax(dim=0)
            step = max(1, math.ceil(a.numel() / self.sample_cap))
            sub = a[::step].float()
            norm = sub / chan.float().clamp_min(1e-30)
        else:
            a = a.reshape(a.shape[0], a.shape[1], -1)            # [N, K, HW]
            chan = a.amax(dim=(0, 2))
            step = max(1, math.ceil(a.numel() / self.sample_cap))
            sub = a[:, :, ::step].float()
            norm = sub / chan.float().clamp_min(1e-30).reshape(1, -1, 1)
        if chan.numel() != self.channels:
            raise ValueError(f"expected {self.channels} input channels, got {chan.numel()}")
        chan = chan.float().cpu()
        self.channel_absmax[group] = torch.maximum(self.channel_absmax[group], chan)
        self.absmax[group] = torch.maximum(self.absmax[group], chan.max())
        self.hist[group] += histogram(sub).cpu()
        self.shape_hist[group] += histogram(norm).cpu()
        self.count[group] += sub.numel()
        self.calls[group] += 1

    # -- views ---------------------------------------------------------------------------------
    def merged(self) -> "LayerStats":
        """All groups folded into one (for a single per-tensor scale)."""
        m = LayerStats(self.kind, self.channels, 1, self.sample_cap)
        m.absmax = self.absmax.amax(0, keepdim=True)
        m.channel_absmax = self.channel_absmax.amax(0, keepdim=True)
        m.hist = self.hist.sum(0, keepdim=True)
        m.shape_hist = self.shape_hist.sum(0, keepdim=True)
        m.count = self.count.sum(0, keepdim=True)
        m.calls = self.calls.sum(0, keepdim=True)
        return m

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"absmax": self.absmax, "channel_absmax": self.channel_absmax, "hist": self.hist,
                "shape_hist": self.shape_hist, "count": self.count, "calls": self.calls}

    @classmethod
    def from_tensors(cls, kind: str, t: dict[str, torch.Tensor], sample_cap: int = DEFAULT_SAMPLE_CAP):
        groups, channels = t["channel_absmax"].shape
        s = cls(kind, channels, groups, sample_cap)
        for k in ("absmax", "channel_absmax", "hist", "shape_hist", "count", "calls"):
            v = t[k]
            want = getattr(s, k)
            if tuple(v.shape) != tuple(want.shape):
                raise ValueError(f"'{k}' has shape {tuple(v.shape)}, expected {tuple(want.shape)}")
            setattr(s, k, v.to(want.dtype).clone())
        return s


# -- clipping values from statistics -----------------------------------------------------------
def _representatives(absmax: float) -> torch.Tensor:
    """A value standing for each bin: its centre, never above the observed absmax."""
    e = bin_edges()
    return ((e[:-1] + e[1:]) / 2).clamp(max=max(absmax, 0.0))


def percentile_clip(hist: torch.Tensor, absmax: float, percentile: float) -> float:
    """|x| value below which ``percentile`` % of the histogrammed values lie (interpolated in its bin)."""
    h = hist.double()
    total = float(h.sum())
    if total == 0 or absmax <= 0:
        return float(absmax)
    if percentile >= 100.0:
        return float(absmax)
    target = percentile / 100.0 * total
    cum = torch.cumsum(h, 0)
    b = int(torch.searchsorted(cum, torch.tensor([target], dtype=torch.float64)).item())
    b = min(b, BINS - 1)
    before = float(cum[b - 1]) if b > 0 else 0.0
    frac = (target - before) / max(float(h[b]), 1.0)
    e = bin_edges()
    value = float(e[b] + frac * (e[b + 1] - e[b]))
    return float(min(value, absmax))


def quantization_mse(hist: torch.Tensor, absmax: float, clip: torch.Tensor) -> torch.Tensor:
    """Expected squared error of symmetric INT8 with clip value(s) ``clip``, from a histogram.

    Per value v: clipped if v > c, error (v - c)^2; otherwise rounding to a step c/127: a value
    under half a step rounds to 0 (error v^2), a larger one has the uniform error step^2 / 12.
    """
    v = _representatives(absmax).reshape(1, -1)
    c = clip.double().reshape(-1, 1)
    step = c / QMAX
    inside = torch.where(v < step / 2, v * v, step * step / 12)
    err = torch.where(v > c, (v - c) ** 2, inside)
    return (err * hist.double().reshape(1, -1)).sum(1)


def mse_clip(hist: torch.Tensor, absmax: float, octaves: int = 12) -> float:
    """The clip value minimising the expected INT8 error: searched over bin edges within
    ``octaves`` below absmax, and absmax itself."""
    if absmax <= 0 or float(hist.sum()) == 0:
        return float(absmax)
    e = bin_edges()
    cands = e[(e < absmax) & (e > absmax * 2.0 ** -octaves)]
    cands = torch.cat([cands, torch.tensor([absmax], dtype=torch.float64)])
    err = quantization_mse(hist, absmax, cands)
    return float(cands[int(torch.argmin(err))])


def smoothed_histogram(shape_hist: torch.Tensor, channel_scale: torch.Tensor) -> torch.Tensor:
    """Estimated histogram of |x_j / s_j| given the within-channel shape histogram and the
    per-channel absmax of the smoothed input (``channel_scale[j] = channel_absmax[j] / s_j``).

    Model: every channel's |x_j| / absmax_j follows the recorded shape; scaling by c shifts a
    histogram on (near-)log bins by log2(c) octaves, so the estimate is the shape convolved with
    the distribution of per-channel shifts, rounded to whole bins (a within-octave error below
    one bin). Exact up to that rounding when channels share one shape; it is what lets
    the percentile / MSE observers work on the smoothed input, whose histogram cannot be recorded
    before alpha is chosen.
    """
    cs = channel_scale.double().clamp_min(2.0 ** MIN_LOG2)
    shifts = torch.round(torch.log2(cs) * BINS_PER_OCTAVE).long()       # bins to move each channel
    lo = int(shifts.min())
    counts = torch.bincount(shifts - lo).double() / cs.numel()          # fraction of channels per shift
    # The shape lives in (0, 1]: log2 <= 0, i.e. bins below -MIN_LOG2*BPO; a shift k moves bin b to b+k.
    conv = torch.nn.functional.conv1d(shape_hist.double().reshape(1, 1, -1),
                                      counts.flip(0).reshape(1, 1, -1), padding=counts.numel() - 1).reshape(-1)
    # conv[i] corresponds to target bin i + lo (full convolution index i = b + (k - lo)).
    out = torch.zeros(BINS, dtype=torch.float64)
    idx = torch.arange(conv.numel()) + lo
    idx = idx.clamp(0, BINS - 1)
    out.index_add_(0, idx, conv)
    return out


def clip_value(stats: LayerStats, group: int, observer: str, percentile: float,
               smooth: torch.Tensor | None = None) -> float:
    """The |x| clip of one group under an observer, on the raw or the smoothed input."""
    if smooth is None:
        absmax = float(stats.absmax[group])
        hist = stats.hist[group]
    else:
        chan = smoothed(stats.channel_absmax[group], smooth.reshape(-1), channel_dim=0)
        absmax = float(chan.max())        # exact: max_j absmax_j / s_j
        if observer != "minmax":
            hist = smoothed_histogram(stats.shape_hist[group], chan) * (float(stats.count[group]) /
                                                                        max(float(stats.shape_hist[group].sum()), 1.0))
    if observer == "minmax":
        return absmax
    if observer == "percentile":
        return percentile_clip(hist, absmax, percentile)
    if observer == "mse":
        return mse_clip(hist, absmax)
    raise ValueError(f"observer={observer!r}; expected minmax, percentile or mse")
