"""Fitting one converted layer on its calibration pairs, by a method chosen to fit the budget.

A layer is fitted from passes over ``pairs()``: the inputs it receives in the partially converted
model and its original's outputs in the original model (asymmetric targets). The method is
chosen before any work, from the layer's shapes and the memory budget (``plan_layer``):

- the layout (which channels are intrinsic, which slot each ghost takes) is chosen on the
  activations unless the layer is too wide for the pair sums (``MAX_PAIR_SUMS``) or its layout
  is shared with other layers of a residual stream (``fixed_layouts``): then it is kept;
- the intrinsic filters are refitted by an exact solve on the input-patch Gram matrix where it
  fits; by conjugate gradients over the stored inputs (``fit/ridge_cg.py``) where it does not;
  not at all where neither fits (the intrinsic channels then stay exact copies);
- the cheap kernels are refitted on the final layout, on every position.

``LayerPlan.method`` is what the conversion record says about it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from ..fit.activations import current_layout
from ..fit.data_driven import (
    RefittedFilters,
    choose_layout,
    copy_costs,
    install,
    refit_filters,
    refit_kernels,
)
from ..fit.ridge_cg import refit_filters_cg
from ..fit.statistics import (
    MAX_PAIR_SUMS,
    WORKSPACE_BYTES,
    InputStatistics,
    KernelStatistics,
    LayerStatistics,
    Sampling,
)
from ..layers.ghost_module import GhostModule
from . import distributed
from .memory import format_bytes, refuse

Pairs = Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]]


@dataclass
class LayerPlan:
    """How one converted layer is fitted (chosen before the work) and what came of it."""

    name: str
    layout: bool  # choose the layout on activations
    refit: str  # "exact", "cg" or "none"
    notes: list[str] = field(default_factory=list)  # why a step was bounded or skipped
    needed: int = 0  # bytes the fit holds at once, besides the activations
    error: float | None = None  # relative output error on the calibration data, after the fit

    @property
    def method(self) -> str:
        """``exact``, ``bounded: ...`` or ``skipped refit: ...``, then the other notes."""
        head = {"exact": "exact", "cg": "bounded: conjugate gradients", "none": "skipped refit"}
        return "; ".join([head[self.refit], *self.notes])


def _sizes(original: nn.Module, ghost: GhostModule) -> dict[str, int]:
    """Bytes each part of a fit holds at once (float64 sums and their solver workspace)."""
    channels = original.out_channels
    taps = ghost.dw_size**ghost.dims + 1
    weights = original.weight.numel()
    return {
        "layout": LayerStatistics.nbytes(original, ghost.dw_size) + 8 * channels**2 * (taps + 8),
        "exact": 3 * InputStatistics.nbytes(original),
        "cg": 12 * 8 * weights,
        "kernels": 8 * ghost.intrinsic_channels * taps * (taps + 2 * ghost.multiplier),
    }


def plan_layer(
    name: str,
    original: nn.Module,
    ghost: GhostModule,
    *,
    refit: bool,
    fixed_layout: bool,
    budget: int,
    batch_bytes: int,
) -> LayerPlan:
    """The fit method for layer ``name`` within ``budget`` bytes (``batch_bytes``: one batch of
    its inputs, outputs and candidate sources, held while a pass runs)."""
    sizes = _sizes(original, ghost)
    taps = ghost.dw_size**ghost.dims + 1
    channels = original.out_channels
    transient = WORKSPACE_BYTES + batch_bytes
    layout = not fixed_layout and channels**2 * taps <= MAX_PAIR_SUMS
    plan = LayerPlan(name, layout, "none")
    if fixed_layout:
        plan.notes.append("layout kept (shared with its residual stream)")
    elif not layout:
        plan.notes.append(
            f"layout kept ({channels} channels: {channels}^2 x {taps} pair sums > {MAX_PAIR_SUMS})"
        )
    base = transient + sizes["kernels"] + (sizes["layout"] if layout else 0)
    if layout and base > budget:
        plan.layout = False
        plan.notes.append(f"layout kept (its pair sums need {format_bytes(base)})")
        base = transient + sizes["kernels"]
    if base > budget:
        raise refuse(name, base, budget, "one batch of its activations and its kernel sums")
    if not refit:
        plan.needed = base
        return plan
    if base + sizes["exact"] <= budget:
        plan.refit = "exact"
    elif base + sizes["cg"] <= budget:
        plan.refit = "cg"
        plan.notes.append(f"the input Gram needs {format_bytes(sizes['exact'])}")
    else:
        plan.notes.append(
            f"the input Gram needs {format_bytes(sizes['exact'])}, conjugate gradients "
            f"{format_bytes(sizes['cg'])}; the intrinsic channels stay exact"
        )
    plan.needed = base + {"exact": sizes["exact"], "cg": sizes["cg"], "none": 0}[plan.refit]
    return plan


def _reduce(tensors: list[torch.Tensor]) -> None:
    distributed.all_reduce_sum(tensors)


def _refit(
    plan: LayerPlan,
    original: nn.Module,
    pairs: Pairs,
    ridge: float,
    stats: LayerStatistics | None,
    sampling: Sampling,
) -> RefittedFilters | None:
    """The intrinsic refit by the planned method; residuals in ``stats``' position units."""
    if plan.refit == "exact":
        inputs = stats.inputs if stats is not None else None
        if inputs is None:
            inputs = InputStatistics(original, sampling.inputs, sampling.seed + 1)
            for x, y in pairs():
                inputs.update(x, y)
            _reduce(inputs.tensors())
        return refit_filters(stats if stats is not None else inputs, original, ridge)
    if plan.refit == "cg":
        result = refit_filters_cg(original, pairs, ridge, reduce=_reduce)
        plan.notes.insert(0, f"{result.iterations} iterations")
        scale = 1.0 if stats is None else float(stats.count) / max(1, result.positions)
        return RefittedFilters(result.weight, result.bias, result.residual * scale)
    return None


@torch.no_grad()
def fit_layer(
    plan: LayerPlan,
    original: nn.Module,
    ghost: GhostModule,
    pairs: Pairs,
    *,
    ridge: float,
    sampling: Sampling,
    channel_weights: torch.Tensor | None,
) -> None:
    """Fit ``ghost`` in place from ``pairs()`` by ``plan``; the same weights on every rank."""
    stats = None
    filters = None
    if plan.layout:
        stats = LayerStatistics(
            original, ghost, refit_intrinsic=plan.refit == "exact", sampling=sampling
        )
        for x, y in pairs():
            stats.update(x, y)
        _reduce(stats.tensors())
        filters = _refit(plan, original, pairs, ridge, stats, sampling)
        own_cost = copy_costs(stats, original.bias)
        if filters is not None:
            own_cost = torch.minimum(own_cost, filters.residual)
        weights = channel_weights
        if weights is None:
            weights = torch.ones(original.out_channels, dtype=torch.float64)
        weights = weights.to(stats.gram.device, torch.float64)
        layout, fits = choose_layout(
            stats, original, ghost, current_layout(ghost), weights, own_cost
        )
        install(original, ghost, layout, fits, filters)
        if filters is None:  # the kernels were fitted on these very sources
            distributed.broadcast_module(ghost)
            return
    else:
        filters = _refit(plan, original, pairs, ridge, None, sampling)
        if filters is not None:
            intrinsic = current_layout(ghost).intrinsic.to(filters.weight.device)
            ghost.primary_conv.weight.copy_(filters.weight[intrinsic])
            if filters.bias is not None:
                ghost.primary_conv.bias.copy_(filters.bias[intrinsic])
    # The kernels of the final layout on its own primary outputs (refitted filters, or a layout
    # that was kept).
    kernels = KernelStatistics(original, ghost, sampling)
    for x, y in pairs():
        kernels.update(x, y)
    _reduce(kernels.tensors())
    refit_kernels(kernels, ghost)
    distributed.broadcast_module(ghost)


class ErrorSum:
    """A layer's relative output error on the calibration data, summed batch by batch."""

    def __init__(self) -> None:
        self.sums = torch.zeros(2, dtype=torch.float64)

    def add(self, output: torch.Tensor, target: torch.Tensor) -> None:
        # Norms per sample in float32, squared and added in float64 (see batchnorm.py).
        difference = torch.linalg.vector_norm((output - target).flatten(1), dim=1)
        energy = torch.linalg.vector_norm(target.flatten(1), dim=1)
        pair = torch.stack([difference, energy]).double().square().sum(dim=1)
        self.sums += pair.cpu()

    def result(self, device: torch.device) -> float:
        """sqrt(sum |output - target|^2 / sum |target|^2) over every rank's data."""
        sums = self.sums.to(device)
        _reduce([sums])
        return float((sums[0] / sums[1].clamp_min(1e-30)).sqrt())
