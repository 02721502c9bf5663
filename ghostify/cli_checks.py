"""Command-line checks that run before any work: output paths, and the input shape's rank.

A command line that cannot work should say so at once, with exit status 2, not after a
minute of conversion.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from torch import nn

from .errors import GhostifyError
from .inputs import eval_mode

CHART_SUFFIXES = (".png", ".svg", ".pdf")
_OUTPUTS = ("out", "report", "markdown", "csv", "chart", "onnx")


class UsageError(GhostifyError):
    """A command line that cannot work, found before any work starts: exit status 2."""


def check_paths(args: argparse.Namespace) -> None:
    """Every output path must be writable (its folder exists) and the chart's suffix known;
    an input weights file must exist."""
    weights = getattr(args, "weights", None)
    if weights is not None and not Path(weights).is_file():
        raise UsageError(f"--weights {str(weights)!r} does not exist or is not a file")
    for option in _OUTPUTS:
        path = getattr(args, option, None)
        if path is None:
            continue
        path = Path(path)
        folder = path.parent if str(path.parent) else Path(".")
        if path.is_dir():
            raise UsageError(f"--{option} {str(path)!r} is a folder; give a file name")
        if not folder.is_dir():
            raise UsageError(f"--{option} {str(path)!r}: the folder {str(folder)!r} does not exist")
        if not os.access(folder, os.W_OK):
            raise UsageError(
                f"--{option} {str(path)!r}: the folder {str(folder)!r} is not writable"
            )
    chart = getattr(args, "chart", None)
    if chart is not None and Path(chart).suffix.lower() not in CHART_SUFFIXES:
        raise UsageError(
            f"--chart {str(chart)!r} must end in {', '.join(CHART_SUFFIXES)} (the suffix picks the "
            "format)"
        )


def first_conv(model: nn.Module) -> tuple[str, nn.Conv2d] | None:
    """The first ``nn.Conv2d`` the model registers (usually its stem), or None."""
    return next(((name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)


def check_input_shape(model: nn.Module, example: torch.Tensor, spec: str) -> None:
    """An input the model's first convolution could not take is a usage error, named with the
    shape that would do; unless the model runs on it anyway (some reshape their input first)."""
    found = first_conv(model)
    if found is None:
        return
    name, conv = found
    shape = tuple(example.shape)
    if len(shape) == 4 and shape[1] == conv.in_channels:
        return
    try:  # only a mismatch costs a forward pass: the model may reshape its input itself
        with eval_mode(model), torch.no_grad():
            model(example)
        return
    except Exception:
        pass
    given = ",".join(map(str, shape))
    spatial = shape[-2:] if len(shape) >= 3 else (224, 224)
    wanted = ",".join(map(str, (shape[0] if len(shape) == 4 else 1, conv.in_channels, *spatial)))
    raise UsageError(
        f"--input-shape {given} does not fit {spec}: its first convolution ({name}, "
        f"{conv.in_channels} input channels) takes N,C,H,W with C={conv.in_channels}, "
        f"e.g. {wanted}"
    )
