"""The building blocks: GhostModule, the GhostNet bottleneck, squeeze-and-excitation."""

from .bottleneck import GhostBottleneck
from .ghost_module import GhostModule, check_conv, conv_config
from .se_layer import SELayer

__all__ = ["GhostBottleneck", "GhostModule", "SELayer", "check_conv", "conv_config"]
