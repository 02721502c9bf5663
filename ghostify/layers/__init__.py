"""The building blocks: GhostModule (1-D, 2-D, 3-D), the GhostNet bottleneck, conv types, SE."""

from .bottleneck import GhostBottleneck
from .conv_types import (
    ConvType,
    register_conv_type,
    registered_conv_types,
    slice_output_channels,
    unregister_conv_type,
)
from .ghost_module import GhostModule, GhostModule1d, GhostModule3d, check_conv, conv_config
from .se_layer import SELayer

__all__ = [
    "ConvType",
    "GhostBottleneck",
    "GhostModule",
    "GhostModule1d",
    "GhostModule3d",
    "SELayer",
    "check_conv",
    "conv_config",
    "register_conv_type",
    "registered_conv_types",
    "slice_output_channels",
    "unregister_conv_type",
]
