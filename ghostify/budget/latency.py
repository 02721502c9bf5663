"""What each form of a layer costs in time, and what a whole model costs.

Each layer form is timed as ``ghostify.deploy`` leaves it (the following BatchNorm folded in:
a convolution with a bias; a GhostModule with its cheap conv's bias and, for a cheap kernel
wider than 1, the intrinsic half's bias after it; with its gather back to the original channel
order where the conversion keeps that layer's order), on the input shape the layer sees, through
the timing database (cached on disk). Identical layers on identical inputs are timed once.

The sum of the layers is not the model (memory traffic between layers, layout changes,
everything that is not a convolution), so the budget measures whole deployed models too and
fits ``model time / original time = a + b x (sum of its layers' times) + c x (layers converted)``
on them (``TimeModel``): SPDY adds the unprunable rest of the model to its layer table (``a``);
``b`` absorbs a different machine state between the table and the model timings, ``c`` what a
converted layer costs beyond its own time (the traffic of its extra tensors).
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


def deployed_form(conv: nn.Module, choice: Choice, kept_order: bool = False) -> nn.Module:
    """``conv`` in form ``choice`` as deploy leaves it after folding a BatchNorm into it (fresh
    weights: a layer's time does not depend on them); ``kept_order``: a GhostModule that gathers
    its outputs back into the original order (a fixed non-identity permutation)."""
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
    if kept_order:
        order = torch.randperm(conv.out_channels, generator=torch.Generator().manual_seed(0))
        ghost.set_channel_order(order)
    return ghost


def form_key(conv: nn.Module, choice: Choice, kept_order: bool = False) -> str:
    """The timing database's key for ``conv`` in form ``choice``, deployed."""
    kind = f"{type(conv).__module__}.{type(conv).__qualname__}"
    config = json.dumps(conv_config(conv), sort_keys=True, separators=(",", ":"))
    order = ":kept-order" if kept_order and not choice.keep else ""
    return f"budget-deployed:{kind}:{config}:{choice.label}{order}"


def time_choices(
    layers: Sequence[LayerOptions],
    database: TimingDatabase,
    *,
    layout: str = "contiguous",
    kept_order: frozenset[str] = frozenset(),
    on_layer: Callable[[str], object] = lambda _name: None,
) -> None:
    """Fill each layer's ``ms``: per form, the sum over the layer's calls of one call's
    time (identical layers on identical inputs share one timing). ``kept_order``: the layers
    whose GhostModules keep a gather (their channel order cannot be folded into consumers)."""
    for layer in layers:
        conv = layer.module
        dtype = conv.weight.dtype
        kept = layer.name in kept_order
        totals = np.zeros(len(layer.choices))
        for shape in layer.site.input_shapes:
            forms = {
                form_key(conv, choice, kept): (
                    lambda c=choice, m=conv, k=kept: deployed_form(m, c, k)
                )
                for choice in layer.choices
            }
            timed = database.time(forms, shape, dtype=dtype, layout=layout)
            totals += [timed[form_key(conv, choice, kept)] for choice in layer.choices]
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
    """``model time / original time = a + b x layer_ms + c x converted``, fitted on whole-model
    measurements (see the module docstring): each point is a plan's (sum of its layers' times,
    layers it converts, measured time ratio).

    With the original alone (``layer_ms = original_layer_ms``, nothing converted, ratio 1), SPDY's
    form: ``b = 1 / original_ms`` (table and model in the same milliseconds), ``c = 0``; with
    two points, ``a`` and ``b`` through both; with more, all three by least squares (``c`` kept
    >= 0, ``b`` > 0: a fit that breaks either falls back to ``a`` and ``b``).
    """

    original_layer_ms: float
    original_ms: float  # the original's measured time
    points: list[tuple[float, int, float]] = field(default_factory=list)

    def add(self, layer_ms: float, converted: int, time_ratio: float) -> None:
        self.points.append((layer_ms, converted, time_ratio))

    def coefficients(self) -> tuple[float, float, float]:
        points = self.points or [(self.original_layer_ms, 0, 1.0)]
        sums = np.array([p[0] for p in points])
        counts = np.array([p[1] for p in points], dtype=np.float64)
        ratios = np.array([p[2] for p in points])
        slope = 1.0 / self.original_ms
        if len(points) >= 3 and np.ptp(counts) > 0:
            design = np.stack([np.ones_like(sums), sums, counts], axis=1)
            (a, b, c), *_ = np.linalg.lstsq(design, ratios, rcond=None)
            if b > 0 and c >= 0:
                return float(a), float(b), float(c)
        if len(points) >= 2 and np.ptp(sums) > 1e-9 * max(1.0, float(sums.max())):
            b, a = np.polyfit(sums, ratios, 1)
            if b > 0:
                return float(a), float(b), 0.0
        return float(ratios.mean() - slope * sums.mean()), slope, 0.0

    def ratio(self, layer_ms: float, converted: int) -> float:
        """Predicted time of a plan over the original's."""
        a, b, c = self.coefficients()
        return a + b * layer_ms + c * converted

    def layer_costs(self, layers: Sequence[LayerOptions]) -> list[list[float]]:
        """Each form's share of the predicted time ratio (``b x ms + c`` if converted): a plan's
        predicted ratio is ``a`` plus the sum of its forms' shares."""
        _, b, c = self.coefficients()
        return [
            [
                b * ms + (0.0 if choice.keep else c)
                for ms, choice in zip(layer.ms, layer.choices, strict=True)
            ]
            for layer in layers
        ]
