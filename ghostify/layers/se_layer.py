"""Squeeze-and-excitation: reweight each channel by a gate computed from the whole feature map."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError


class SELayer(nn.Module):
    """Global average pool, two linear layers (reduction, ReLU between), gate clamped to [0, 1].

    The clamp (rather than a sigmoid) follows the GhostNet article's code: a hard gate that is
    cheap on mobile hardware. The hidden width is ``channels // reduction``, at least 1.
    """

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        if not isinstance(channels, int) or channels < 1:
            raise ConfigError(f"channels must be a positive int; got {channels!r}")
        if not isinstance(reduction, int) or reduction < 1:
            raise ConfigError(f"reduction must be a positive int; got {reduction!r}")
        hidden = max(1, channels // reduction)
        self.channels = channels
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(
            nn.Linear(channels, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels = x.shape[:2]
        gate = self.fc(self.avg_pool(x).view(batch, channels)).view(batch, channels, 1, 1)
        return x * torch.clamp(gate, 0, 1)
