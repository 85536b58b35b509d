"""Timestep groups: which set of static activation scales is in force for the current step.

Activation ranges drift across the denoising trajectory, so calibration records statistics per
group of noise levels and a static layer keeps one input scale per group. One ``GroupSelector``
is shared by all layers of a quantized model; whoever drives the model (a ComfyUI model wrapper,
a test) calls ``select(sigma)`` before each forward. Groups are defined on log-sigma, where
samplers space their steps roughly evenly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class GroupSelector:
    """Maps a noise level sigma to a group index via ascending sigma boundaries.

    ``boundaries`` has groups-1 values; group g holds boundaries[g-1] <= sigma < boundaries[g].
    Group 0 is the least noisy (end of sampling).
    """
    boundaries: list[float] = field(default_factory=list)
    index: int = 0

    @property
    def groups(self) -> int:
        return len(self.boundaries) + 1

    def group_of(self, sigma: float) -> int:
        g = 0
        for b in self.boundaries:
            if sigma >= b:
                g += 1
        return g

    def select(self, sigma) -> int:
        if isinstance(sigma, torch.Tensor):
            # A batch shares one step; use its largest sigma (they are equal in ComfyUI samplers).
            sigma = float(sigma.detach().float().max())
        self.index = self.group_of(float(sigma))
        return self.index

    @classmethod
    def from_sigmas(cls, sigmas, groups: int) -> "GroupSelector":
        """Split the sampled sigmas into `groups` contiguous bands of roughly equal step count."""
        values = sorted(float(s) for s in sigmas if float(s) > 0)
        if groups < 1:
            raise ValueError("groups must be >= 1")
        if groups == 1 or len(values) < 2:
            return cls([])
        groups = min(groups, len(values))
        bounds = []
        for g in range(1, groups):
            i = round(g * len(values) / groups)
            lo, hi = values[i - 1], values[i]
            # Geometric midpoint: samplers space sigmas roughly evenly in log space.
            bounds.append(math.sqrt(lo * hi))
        return cls(bounds)

    def to_dict(self) -> dict:
        return {"boundaries": list(self.boundaries)}

    @classmethod
    def from_dict(cls, d: dict) -> "GroupSelector":
        return cls(list(d.get("boundaries", [])))
