"""Fitting a GhostModule on real activations: dispatch the inputs to the right statistics.

Inputs come as a tensor, an iterable of batches or of ``(inputs, targets)`` pairs, or as
statistics a caller accumulated itself (a layer-by-layer calibration, a distributed run that
all-reduced them). Every fit is a least-squares solve on sums, so memory does not grow with the
number of images.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn

from ..errors import ConfigError
from ..layers.ghost_module import GhostModule
from .data_driven import choose_layout, copy_costs, install, refit_filters, refit_kernels
from .data_free import GhostLayout
from .statistics import KernelStatistics, LayerStatistics

CHOICES = ("activations", "weights")


def _pairs(
    activations: torch.Tensor | Iterable, targets: torch.Tensor | None
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    if isinstance(activations, torch.Tensor):
        yield activations, targets
        return
    if targets is not None:
        raise ConfigError("targets= goes with one input tensor; pass (inputs, targets) pairs")
    for batch in activations:
        if isinstance(batch, tuple | list) and len(batch) == 2:
            yield batch[0], batch[1]
        else:
            yield batch, None


def accumulate(
    stats: LayerStatistics | KernelStatistics,
    activations: torch.Tensor | Iterable,
    targets: torch.Tensor | None = None,
) -> None:
    """Add every batch of ``activations`` to ``stats``; at least one is required."""
    seen = 0
    for inputs, wanted in _pairs(activations, targets):
        stats.update(inputs, wanted)
        seen += 1
    if seen == 0:
        raise ConfigError("activations held no batch: pass at least one input tensor")


def current_layout(ghost: GhostModule) -> GhostLayout:
    """The layout ``ghost`` computes now, read off its channel order."""
    position = ghost.output_position
    m = ghost.intrinsic_channels
    channel_at = torch.empty_like(position)
    channel_at[position] = torch.arange(len(position))
    ghosts = torch.nonzero(position >= m).flatten()
    return GhostLayout(channel_at[:m].clone(), ghosts, position[ghosts] - m, torch.empty(0))


@torch.no_grad()
def fit_on_activations(
    original: nn.Module,
    ghost: GhostModule,
    activations: torch.Tensor | Iterable | LayerStatistics | KernelStatistics,
    *,
    targets: torch.Tensor | None = None,
    choose: str = "activations",
    refit_intrinsic: bool = False,
    intrinsic_ridge: float = 0.05,
    channel_weights: torch.Tensor | None = None,
) -> GhostModule:
    """Refine ``ghost`` (already fitted data-free) on activations; see ``ghostify.fit``."""
    if choose not in CHOICES:
        raise ConfigError(f"choose must be one of {CHOICES}; got {choose!r}")
    if isinstance(activations, KernelStatistics) or choose == "weights":
        stats = activations
        if not isinstance(stats, KernelStatistics):
            stats = KernelStatistics(original, ghost)
            accumulate(stats, activations, targets)
        refit_kernels(stats, ghost)
        return ghost
    if not isinstance(activations, LayerStatistics):
        if refit_intrinsic and not isinstance(activations, torch.Tensor):
            activations = list(activations)  # read twice: for the layout, then the kernels
        stats = LayerStatistics(original, ghost, refit_intrinsic=refit_intrinsic)
        accumulate(stats, activations, targets)
    else:
        stats = activations
        if refit_intrinsic and not stats.refit_intrinsic:
            raise ConfigError(
                "refit_intrinsic needs LayerStatistics(..., refit_intrinsic=True) (the input Gram)"
            )
    weights = _channel_weights(channel_weights, original.out_channels, stats.gram.device)
    filters = None
    own_cost = copy_costs(stats, original.bias)
    if refit_intrinsic:
        filters = refit_filters(stats, original, intrinsic_ridge)
        own_cost = torch.minimum(own_cost, filters.residual)
    layout, fits = choose_layout(stats, original, ghost, current_layout(ghost), weights, own_cost)
    install(original, ghost, layout, fits, filters)
    if filters is not None and not isinstance(activations, LayerStatistics):
        kernels = KernelStatistics(original, ghost)
        accumulate(kernels, activations, targets)
        refit_kernels(kernels, ghost)
    return ghost


def _channel_weights(
    weights: torch.Tensor | None, channels: int, device: torch.device
) -> torch.Tensor:
    if weights is None:
        return torch.ones(channels, dtype=torch.float64, device=device)
    weights = torch.as_tensor(weights)
    if weights.shape != (channels,) or not bool((weights >= 0).all()):
        raise ConfigError(
            f"channel_weights must be {channels} non-negative numbers, one per output channel; "
            f"got shape {tuple(weights.shape)}"
        )
    return weights.to(device=device, dtype=torch.float64)
