"""The feature network for FID on the Fashion-MNIST reference models (no ComfyUI import).

No Inception/CLIP backbone can be had offline here, so FID is computed in the feature space of a
small Fashion-MNIST classifier we train ourselves (models/train_reference.py). FID numbers are
therefore only comparable with other numbers made with the same network (the file's hash is
recorded in docs/QUALITY.md), never with published FIDs.
"""
from __future__ import annotations

import torch
from torch import nn

FEATURE_DIM = 64


class FashionClassifier(nn.Module):
    """Input [B, 1, 32, 32] in [0, 1] (28x28 padded by 2); ``features`` is the 64-d penultimate layer."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
            nn.Flatten(), nn.Dropout(0.2), nn.Linear(128, FEATURE_DIM), nn.ReLU(),
        )
        self.head = nn.Linear(FEATURE_DIM, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def load_classifier(path: str) -> tuple[FashionClassifier, dict]:
    """The shipped classifier in eval mode (fp32) and its metadata (test accuracy, training record)."""
    import json

    from safetensors import safe_open
    net = FashionClassifier()
    with safe_open(path, framework="pt") as f:
        sd = {k: f.get_tensor(k).float() for k in f.keys()}
        meta = json.loads((f.metadata() or {}).get("octet_classifier", "{}"))
    sd = {k: (v.long() if k.endswith("num_batches_tracked") else v) for k, v in sd.items()}
    net.load_state_dict(sd)
    return net.eval(), meta
