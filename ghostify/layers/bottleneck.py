"""GhostBottleneck: the GhostNet block, for users who build Ghost networks directly."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from .ghost_module import GhostModule
from .se_layer import SELayer


class GhostBottleneck(nn.Module):
    """Ghost module (ReLU) -> [depthwise stride-2 conv] -> [SE] -> Ghost module -> + shortcut.

    The second Ghost module has no ReLU, as in the paper: a ReLU after the projection would
    destroy information in the narrow output. The shortcut is the identity when the shape is kept,
    otherwise a depthwise conv (with the block's stride) and a 1x1 conv, each followed by BN.
    """

    def __init__(
        self,
        in_channels: int,
        mid_channels: int,
        out_channels: int,
        dw_kernel_size: int = 3,
        stride: int = 1,
        use_se: bool = False,
        ratio: int = 2,
    ) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ConfigError(f"stride must be 1 or 2; got {stride!r}")
        if not isinstance(dw_kernel_size, int) or dw_kernel_size < 1 or dw_kernel_size % 2 == 0:
            raise ConfigError(f"dw_kernel_size must be an odd int >= 1; got {dw_kernel_size!r}")
        self.stride = stride
        self.ghost1 = GhostModule(
            in_channels, mid_channels, ratio=ratio, batch_norm=True, relu=True
        )
        if stride > 1:
            self.conv_dw = nn.Conv2d(
                mid_channels,
                mid_channels,
                dw_kernel_size,
                stride,
                (dw_kernel_size - 1) // 2,
                groups=mid_channels,
                bias=False,
            )
            self.bn_dw = nn.BatchNorm2d(mid_channels)
        self.se = SELayer(mid_channels) if use_se else nn.Identity()
        self.ghost2 = GhostModule(
            mid_channels, out_channels, ratio=ratio, batch_norm=True, relu=False
        )
        if in_channels == out_channels and stride == 1:
            self.shortcut: nn.Module = nn.Identity()
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(
                    in_channels,
                    in_channels,
                    dw_kernel_size,
                    stride,
                    (dw_kernel_size - 1) // 2,
                    groups=in_channels,
                    bias=False,
                ),
                nn.BatchNorm2d(in_channels),
                nn.Conv2d(in_channels, out_channels, 1, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.ghost1(x)
        if self.stride > 1:
            out = self.bn_dw(self.conv_dw(out))
        out = self.ghost2(self.se(out))
        return out + self.shortcut(x)
