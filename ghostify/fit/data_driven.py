"""Choosing a GhostModule's layout on real activations, from ``LayerStatistics``.

Every quantity is a least-squares residual read off the accumulated sums, weighted per output
channel (by the square of the following BatchNorm's scale, where there is one, since that is how
much an error in the channel still counts after normalisation):

- ``pair_costs[t, s]``: target channel ``t`` made as a ghost of source ``s`` (a fitted depthwise
  kernel on ``s``'s output, plus a bias where the layer has one);
- ``intrinsic_costs[t]``: target ``t`` computed by the primary conv, with its original filter or
  a filter refitted by ridge regression towards the original one.

The intrinsic set is chosen greedily (facility location: add the channel that lowers the total
cost most), the ghosts are assigned to the balanced slots optimally (``assignment.py``), and the
result is kept only if it beats the data-free layout on the same sums.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..layers.ghost_module import GhostModule
from .assignment import assign_balanced
from .data_free import GhostLayout
from .statistics import InputStatistics, KernelStatistics, LayerStatistics

_RIDGE = 1e-6


def solve(system: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Batched ``system @ x = rhs``.

    On the CPU through numpy: torch's batched LAPACK path takes seconds for a few hundred tiny
    systems on the 2-core test box, numpy milliseconds.
    """
    if system.device.type == "cpu":
        return torch.from_numpy(np.linalg.solve(system.numpy(), rhs.numpy()))
    return torch.linalg.solve(system, rhs)


def solve_positive(system: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Batched ``system @ x = rhs`` for symmetric positive definite systems (Cholesky).

    Large systems through torch (multithreaded LAPACK: 2-10x scipy's time for 1,000-5,000
    unknowns on the 2-core box), many small ones through scipy.
    """
    if system.device.type != "cpu" or system.shape[-1] >= 256:
        return torch.cholesky_solve(rhs, torch.linalg.cholesky(system))
    from scipy.linalg import cho_factor, cho_solve

    solved = [
        cho_solve(cho_factor(a, check_finite=False), b, check_finite=False)
        for a, b in zip(system.numpy(), rhs.numpy(), strict=True)
    ]
    return torch.from_numpy(np.stack(solved))


def _solve(system: torch.Tensor, rhs: torch.Tensor, ridge: float = _RIDGE) -> torch.Tensor:
    """Batched ``system @ x = rhs`` with a small ridge relative to each system's diagonal."""
    scale = system.diagonal(dim1=-2, dim2=-1).mean(dim=-1).clamp_min(1e-12)
    eye = torch.eye(system.shape[-1], dtype=system.dtype, device=system.device)
    return solve(system + (ridge * scale)[..., None, None] * eye, rhs)


def _features(stats: LayerStatistics | KernelStatistics, with_bias: bool) -> slice:
    """The tap features a fit uses: the kernel's taps, and the constant if the layer has a bias."""
    taps = stats.gram.shape[-1] - 1
    return slice(0, taps + int(with_bias))


@dataclass
class PairFits:
    """Least-squares fits of every target channel from every source channel."""

    cost: torch.Tensor  # (targets, sources): weighted squared residuals, CPU float64
    solution: torch.Tensor  # (sources, features, targets): kernel taps (and bias)


def pair_fits(stats: LayerStatistics, with_bias: bool, weights: torch.Tensor) -> PairFits:
    """Every (target, source) ghost fit and its weighted residual."""
    used = _features(stats, with_bias)
    gram = stats.gram[:, used, used]
    cross = stats.cross[:, used, :]  # (sources, features, targets)
    solution = _solve(gram, cross)  # (sources, features, targets)
    explained = (cross * solution).sum(dim=1)  # (sources, targets)
    residual = (stats.target_sq[None, :] - explained).clamp_min(0.0)
    return PairFits((residual.T * weights[:, None]).cpu(), solution)


def copy_costs(stats: LayerStatistics, bias: torch.Tensor | None) -> torch.Tensor:
    """Unweighted squared error of each channel computed by its own original filter.

    The sources are the original filters' outputs on these inputs (bias included), so the
    error is ``|y|^2 - 2 <y, p> + |p|^2``, all read off the sums at the centre tap.
    """
    centre = (stats.gram.shape[-1] - 1) // 2
    channels = torch.arange(stats.target_sq.shape[0], device=stats.gram.device)
    inner = stats.cross[channels, centre, channels]
    energy = stats.gram[:, centre, centre]
    del bias  # already inside the sources
    return (stats.target_sq - 2 * inner + energy).clamp_min(0.0)


@dataclass
class RefittedFilters:
    """Ridge refits of every original filter to its target on the layer's real inputs."""

    weight: torch.Tensor  # like the original weight
    bias: torch.Tensor | None
    residual: torch.Tensor  # (out,), unweighted squared errors


def refit_filters(
    stats: LayerStatistics | InputStatistics, original: torch.nn.Module, strength: float
) -> RefittedFilters:
    """Refit every filter by ridge regression towards the original: ``|y - Xw|^2 + l|w - w0|^2``.

    ``l`` is ``strength`` times the mean diagonal of the group's input Gram matrix, so it does
    not depend on the scale of the activations. A strong ridge keeps the filter the original
    (exact intrinsic channels); a weak one lets it compensate the errors of earlier layers.
    Residuals are scaled to the layout sums' positions where those were sampled apart.
    """
    inputs = stats.inputs if isinstance(stats, LayerStatistics) else stats
    assert inputs is not None, "refit_filters needs the input Gram (refit_intrinsic=True)"
    weight = original.weight.detach()
    groups = original.groups
    with_bias = original.bias is not None
    size = weight[0].numel() + int(with_bias)
    gram = inputs.gram[:, :size, :size]
    cross = inputs.cross[:, :size]  # (groups, size, out/groups)
    prior = weight.flatten(1).double()
    if with_bias:
        prior = torch.cat([prior, original.bias.detach().double()[:, None]], dim=1)
    prior = prior.view(groups, -1, size).transpose(1, 2)  # (groups, size, out/groups)
    scale = gram.diagonal(dim1=1, dim2=2).mean(dim=1).clamp_min(1e-12) * strength
    eye = torch.eye(size, dtype=gram.dtype, device=gram.device)
    rhs = cross + scale[:, None, None] * prior
    solution = solve_positive(gram + scale[:, None, None] * eye, rhs)
    # |y - Xw|^2 = |y|^2 - 2 w.c + w.G.w, and at the ridge solution G w = c + l (w0 - w).
    curvature = (solution * cross).sum(dim=1) + scale[:, None] * (
        solution * (prior - solution)
    ).sum(dim=1)
    fitted = curvature - 2 * (solution * cross).sum(dim=1)
    residual = (inputs.target_sq + fitted.reshape(-1)).clamp_min(0.0)
    if isinstance(stats, LayerStatistics):
        residual = residual * (stats.count / inputs.count.clamp_min(1.0))
    flat = solution.transpose(1, 2).reshape(weight.shape[0], size)
    new_weight = flat[:, : weight[0].numel()].view_as(weight).to(weight.dtype)
    new_bias = flat[:, -1].to(weight.dtype) if with_bias else None
    return RefittedFilters(new_weight, new_bias, residual)


def greedy_intrinsic(
    cost: torch.Tensor,
    own_cost: torch.Tensor,
    empty_cost: torch.Tensor,
    groups: int,
    per_group: int,
) -> torch.Tensor:
    """Choose ``per_group`` channels of each group to compute exactly (facility location).

    ``cost[t, s]`` is target ``t`` as a ghost of ``s``; ``own_cost[t]`` is ``t`` computed by the
    primary conv; ``empty_cost[t]`` is ``t`` left at zero. Each step adds the channel that
    lowers the total cost most, every other channel taking its cheapest chosen source
    (capacities are settled by the assignment after).
    """
    matrix = cost.numpy()
    own = own_cost.numpy()
    channels = matrix.shape[0]
    per_group_out = channels // groups
    group_of = np.arange(channels) // per_group_out
    current = empty_cost.numpy().copy()
    chosen = np.zeros(channels, dtype=bool)
    quota = np.full(groups, per_group)
    for _ in range(groups * per_group):
        open_ = ~chosen
        drop = np.clip(current[:, None] - matrix, 0.0, None) * open_[:, None]
        gains = drop.sum(axis=0) - np.diag(drop) + (current - own)
        gains[chosen | (quota[group_of] == 0)] = -np.inf
        best = int(gains.argmax())
        chosen[best] = True
        quota[group_of[best]] -= 1
        current = np.minimum(current, matrix[:, best])
        current[best] = own[best]
    return torch.from_numpy(np.nonzero(chosen)[0])


def layout_cost(layout: GhostLayout, fits: PairFits, own_cost: torch.Tensor, ghost) -> float:
    """Total weighted cost of ``layout`` under these statistics."""
    source = layout.intrinsic.cpu()[ghost.slot_source[layout.slot.cpu()]]
    ghosts = fits.cost[layout.ghosts.cpu(), source].sum()
    return float(ghosts + own_cost[layout.intrinsic.cpu()].sum())


def assign(
    intrinsic: torch.Tensor, fits: PairFits, ghost: GhostModule, channels: int
) -> GhostLayout:
    """The layout with these intrinsic channels and the cheapest balanced ghost assignment."""
    is_ghost = torch.ones(channels, dtype=torch.bool)
    is_ghost[intrinsic] = False
    ghosts = torch.nonzero(is_ghost).flatten()
    slot = assign_balanced(fits.cost[ghosts][:, intrinsic], ghost.slot_source)
    return GhostLayout(intrinsic, ghosts, slot, torch.empty(0))


def choose_layout(
    stats: LayerStatistics,
    original: torch.nn.Module,
    ghost: GhostModule,
    baseline: GhostLayout,
    weights: torch.Tensor,
    own_cost: torch.Tensor,
) -> tuple[GhostLayout, PairFits]:
    """The better of the greedy layout and ``baseline`` on these statistics, kernels fitted."""
    with_bias = original.bias is not None
    fits = pair_fits(stats, with_bias, weights)
    own = (own_cost * weights).cpu()
    per_group = ghost.intrinsic_channels // ghost.groups
    empty = (stats.target_sq * weights).cpu()
    intrinsic = greedy_intrinsic(fits.cost, own, empty, ghost.groups, per_group)
    candidate = assign(intrinsic, fits, ghost, original.out_channels)
    baseline = GhostLayout(
        baseline.intrinsic.cpu(), baseline.ghosts.cpu(), baseline.slot.cpu(), torch.empty(0)
    )
    if layout_cost(baseline, fits, own, ghost) < layout_cost(candidate, fits, own, ghost):
        candidate = baseline
    return candidate, fits


def install(
    original: torch.nn.Module,
    ghost: GhostModule,
    layout: GhostLayout,
    fits: PairFits,
    filters: RefittedFilters | None,
) -> None:
    """Write ``layout`` into ``ghost``: primary filters, cheap kernels and biases, channel order."""
    weight = original.weight.detach() if filters is None else filters.weight
    bias = original.bias
    if filters is not None:
        bias = filters.bias
    device = weight.device
    intrinsic, ghosts, slot = (t.to(device) for t in (layout.intrinsic, layout.ghosts, layout.slot))
    ghost.primary_conv.weight.copy_(weight[intrinsic])
    if bias is not None:
        ghost.primary_conv.bias.copy_(bias.detach()[intrinsic])
    kernel = ghost.cheap_conv.weight.shape[2:]  # (dw_size,) * dims
    taps = kernel.numel()
    source = intrinsic[ghost.slot_source.to(device)[slot]]
    solution = fits.solution[source, :, ghosts]  # (ghosts, features)
    cheap = torch.zeros_like(ghost.cheap_conv.weight)
    cheap[slot, 0] = solution[:, :taps].reshape(-1, *kernel).to(cheap.dtype)
    ghost.cheap_conv.weight.copy_(cheap)
    if ghost.cheap_conv.bias is not None:
        cheap_bias = torch.zeros_like(ghost.cheap_conv.bias)
        cheap_bias[slot] = solution[:, taps].to(cheap_bias.dtype)
        ghost.cheap_conv.bias.copy_(cheap_bias)
    position = torch.empty(ghost.out_channels, dtype=torch.long, device=device)
    position[intrinsic] = torch.arange(ghost.intrinsic_channels, device=device)
    position[ghosts] = ghost.intrinsic_channels + slot
    ghost.set_channel_order(position)


def refit_kernels(stats: KernelStatistics, ghost: GhostModule) -> None:
    """Refit ``ghost``'s cheap kernels (and biases) on its current layout, from the sums."""
    with_bias = ghost.cheap_conv.bias is not None
    used = _features(stats, with_bias)
    source = ghost.slot_source.to(stats.gram.device)
    system = stats.gram[source][:, used, used]
    solution = _solve(system, stats.cross[:, used].unsqueeze(-1)).squeeze(-1)
    slots = ghost.ghost_channels
    weight = ghost.cheap_conv.weight
    kernel = weight.shape[2:]  # (dw_size,) * dims
    taps = kernel.numel()
    weight[:slots, 0] = solution[:, :taps].view(slots, *kernel).to(weight.dtype)
    if with_bias:
        ghost.cheap_conv.bias[:slots] = solution[:, taps].to(weight.dtype)
