"""QATConfig: how to fine-tune (steps, learning rates, LoRA rank, weight width, held-back calls)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..api import OctetError

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
