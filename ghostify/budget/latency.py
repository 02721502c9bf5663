"""What each form of a layer costs in time, and what a whole model costs.

Each layer form is timed as ``ghostify.deploy`` leaves it (the following BatchNorm folded in:
a convolution with a bias; a GhostModule with its cheap conv's bias and, for a cheap kernel
wider than 1, the intrinsic half's bias after it), on the input shape the layer sees, through
the timing database (cached on disk). Identical layers on identical inputs are timed once.

The sum of the layers is not the model (memory traffic between layers, layout changes, gathers
that a layer's channel order keeps, everything that is not a convolution), so the budget
measures whole deployed models too and fits ``model time = a + b x (sum of its layers' times)``
on them (``TimeModel``), as SPDY adds the unprunable rest of the model to its layer table.
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from ..errors import ConfigError
from ..layers.conv_types import conv_config, conv_dims
from ..layers.ghost_module import GhostModule
from ..timing import TimingDatabase, runner, time_interleaved
from .choices import Choice, LayerOptions

_BATCHNORMS = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
MODEL_ROUNDS = 9


def deployed_form(conv: nn.Module, choice: Choice) -> nn.Module:
    """``conv`` in form ``choice`` as deploy leaves it after folding a BatchNorm into it (fresh
    weights: a layer's time does not depend on them)."""
    batchnorm = _BATCHNORMS[conv_dims(conv)](conv.out_channels).eval()
    if choice.keep:
        fresh = copy.deepcopy(conv).eval()
        try:
            return fuse_conv_bn_eval(fresh, batchnorm)
        except Exception:  # a conv type torch cannot fuse: timed as it is
            return fresh
    ghost = GhostModule.like(conv, ratio=choice.ratio, dw_size=choice.dw_size).eval()
    with contextlib.suppress(ConfigError):  # a primary that cannot be rescaled: kept apart
        ghost.fold_batchnorm(batchnorm)
    return ghost


def form_key(conv: nn.Module, choice: Choice) -> str:
    """The timing database's key for ``conv`` in form ``choice``, deployed."""
    kind = f"{type(conv).__module__}.{type(conv).__qualname__}"
    config = json.dumps(conv_config(conv), sort_keys=True, separators=(",", ":"))
    return f"budget-deployed:{kind}:{config}:{choice.label}"


def time_choices(
    layers: Sequence[LayerOptions],
    database: TimingDatabase,
    *,
    layout: str = "contiguous",
    on_layer: Callable[[str], object] = lambda _name: None,
) -> None:
    """Fill each layer's ``ms``: per form, the sum over the layer's calls of one call's median
    time (identical layers on identical inputs share one timing)."""
    for layer in layers:
        conv = layer.module
        dtype = conv.weight.dtype
        totals = np.zeros(len(layer.choices))
        for shape in layer.site.input_shapes:
            forms = {
                form_key(conv, choice): (lambda c=choice, m=conv: deployed_form(m, c))
                for choice in layer.choices
            }
            timed = database.time(forms, shape, dtype=dtype, layout=layout)
            totals += [timed[form_key(conv, choice)] for choice in layer.choices]
        layer.ms = totals.tolist()
        on_layer(layer.name)


def time_models(
    models: Sequence[nn.Module],
    args: tuple[Any, ...],
    runtime: str,
    rounds: int = MODEL_ROUNDS,
) -> list[float]:
    """Median milliseconds of one forward of each (deployed) model, timed interleaved."""
    calls = [runner(model, args, runtime) for model in models]
    with torch.inference_mode():
        return time_interleaved(calls, rounds=rounds, min_sample_ms=0.0, warmup=2)


@dataclass
class TimeModel:
    """``model time / original time = a + b x (sum of the layers' times) / original time``,
    fitted on whole-model measurements: each point is (layer sum in ms, measured time ratio)."""

    original_ms: float  # the original's sum of layer times (its plan: every layer kept)
    points: list[tuple[float, float]] = field(default_factory=list)

    def add(self, layer_ms: float, time_ratio: float) -> None:
        self.points.append((layer_ms, time_ratio))

    def coefficients(self) -> tuple[float, float]:
        """(a, b) by least squares on every point; with one point, b = 1 (SPDY's rest term)."""
        if not self.points:
            return 0.0, 1.0 / self.original_ms
        sums = np.array([p[0] for p in self.points])
        ratios = np.array([p[1] for p in self.points])
        if len(self.points) == 1 or np.ptp(sums) <= 1e-9 * max(1.0, sums.max()):
            slope = 1.0 / self.original_ms
            return float(ratios.mean() - slope * sums.mean()), slope
        slope, intercept = np.polyfit(sums, ratios, 1)
        if slope <= 0:  # noise beyond the spread of the points: fall back to SPDY's form
            slope = 1.0 / self.original_ms
            intercept = ratios.mean() - slope * sums.mean()
        return float(intercept), float(slope)

    def ratio(self, layer_ms: float) -> float:
        """Predicted time of a plan over the original's."""
        intercept, slope = self.coefficients()
        return intercept + slope * layer_ms

    def layer_limit(self, speedup: float) -> float:
        """The largest layer sum predicted to run ``speedup`` times as fast as the original."""
        intercept, slope = self.coefficients()
        return (1.0 / speedup - intercept) / slope
