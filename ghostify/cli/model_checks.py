"""Command-line checks that need the model: does the example input fit its first convolution?

torch's own error for an input of the wrong rank or channel count names neither the flag nor
the shape that would do; these checks do, with exit status 2, before the conversion starts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..inputs import eval_mode
from ..layers.conv_types import TORCH_CONVS
from ..layers.ghost_module import GhostModule
from .checks import UsageError

_LETTERS = {1: "L", 2: "H,W", 3: "D,H,W"}


def first_conv(model: nn.Module) -> tuple[str, nn.Module, int] | None:
    """``(name, layer, spatial dims)`` of the first convolution the model registers (usually
    its stem; a GhostModule counts, as in a converted checkpoint), or None."""
    for name, module in model.named_modules():
        if isinstance(module, GhostModule):
            return name, module, module.dims
        dims = next((d for cls, d in TORCH_CONVS.items() if isinstance(module, cls)), None)
        if dims is not None:
            return name, module, dims
    return None


def _runs(model: nn.Module, shape: Sequence[int]) -> bool:
    """Whether the model takes a random input of ``shape`` (some reshape their input first)."""
    example = torch.randn(tuple(shape), generator=torch.Generator().manual_seed(0))
    try:
        with eval_mode(model), torch.no_grad():
            model(example)
        return True
    except Exception:
        return False


def check_input_shape(
    model: nn.Module, shape: Sequence[int], spec: str, what: str = "--input-shape"
) -> None:
    """An input of ``shape`` that the model's first convolution cannot take is a usage error
    naming the shape that would do; unless the model runs on it anyway.

    ``what`` names where the shape came from (the flag, the calibration data, a default).
    """
    found = first_conv(model)
    if found is None:
        return
    name, conv, dims = found
    shape = tuple(shape)
    channels = conv.in_channels
    if len(shape) == dims + 2 and shape[1] == channels:
        return
    if _runs(model, shape):  # only a mismatch costs a forward pass
        return
    batch = shape[0] if len(shape) == dims + 2 else 1
    spatial = shape[2:] if len(shape) == dims + 2 else (224,) * dims if dims < 3 else (16, 112, 112)
    wanted = ",".join(map(str, (batch, channels, *spatial)))
    given = ",".join(map(str, shape))
    kind = type(conv).__name__
    raise UsageError(
        f"{what} {given} does not fit {spec}: its first convolution ({name}, {kind}, "
        f"{channels} input channels) takes N,C,{_LETTERS.get(dims, '...')} inputs with "
        f"C={channels}, e.g. --input-shape {wanted}"
    )
