"""Model factories for the command-line tests, named by ``cli_models:NAME`` SPECs."""

from __future__ import annotations

import torch
from torch import nn


def digits_cnn() -> nn.Sequential:
    """A small CNN for 8x8 greyscale digits: three 3x3 convolutions and a linear classifier."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )


class _Unsqueeze(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.unsqueeze(1)


def takes_3d() -> nn.Sequential:
    """A model that takes (N, H, W) images and adds the channel dimension itself."""
    return nn.Sequential(_Unsqueeze(), nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, 3))
