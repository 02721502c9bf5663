"""Library layers the passes recognise, looked up only when their library is already imported
(a model built with torchvision has imported it; ghostify never imports it for them)."""

from __future__ import annotations

import sys
from collections.abc import Callable


def frozen_batchnorms() -> tuple[type, ...]:
    """torchvision's FrozenBatchNorm2d (detection backbones): fx would trace into its
    multiply-add of buffers, which hides that it acts on each channel alone, so it is a leaf."""
    if "torchvision" not in sys.modules:
        return ()
    from torchvision.ops.misc import FrozenBatchNorm2d

    return (FrozenBatchNorm2d,)


def per_sample_functions() -> tuple[Callable, ...]:
    """Functions scaling whole samples (torchvision's stochastic depth): each channel alike."""
    if "torchvision" not in sys.modules:
        return ()
    from torchvision.ops import stochastic_depth

    return (stochastic_depth,)
