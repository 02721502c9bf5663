"""What each form of a layer loses: its relative output error, before any weighting.

Without data, the data-free fit's own residual: the squared distance between each original
filter and what the GhostModule makes of it (exact for the kept filters, the fitted depthwise
kernel's residual for each ghost), over the layer's total filter energy. For white inputs this is
the layer's relative output error. It is read off the fit's pieces, one fit per form, without
building a module (``data_free_losses``).

With calibration data, the relative output error on real activations, read off the sums that
``ghostify.tune.layer_statistics`` accumulates over one pass of the original model (every
ratio's and dw_size's error from the same sums, as the calibrated fit would choose the layout;
``statistics_losses``).
"""

from __future__ import annotations

import heapq

import numpy as np
import torch
from torch import nn

from ..fit.assignment import assign_balanced
from ..fit.data_driven import copy_costs, pair_fits
from ..fit.data_free import draft_from
from ..fit.geometry import FilterGeometry
from ..fit.kept_filters import KeptFilters, select_intrinsic
from ..fit.kernels import fit_cheap_kernels
from ..fit.statistics import LayerStatistics
from ..layers.conv_types import conv_dims, conv_type_of, plain_type
from ..options import intrinsic_count
from .choices import Choice


def slot_source(out_channels: int, intrinsic: int) -> torch.Tensor:
    """The intrinsic channel each ghost slot reads (as ``GhostModule.slot_source``)."""
    ghosts = out_channels - intrinsic
    multiplier = -(-ghosts // intrinsic)
    return torch.arange(ghosts) // multiplier


@torch.no_grad()
def data_free_losses(conv: nn.Module, choices: list[Choice]) -> list[float]:
    """The data-free fit's relative residual of ``conv`` in each form (0 for ``KEEP``)."""
    kind = conv_type_of(conv) or plain_type(conv_dims(conv))
    weight = kind.effective_weight(conv).detach()
    energy = float(weight.double().square().sum())
    if energy == 0:
        return [0.0 for _ in choices]
    # The filters' cosines are computed once for every ratio (as the selection reads them).
    geometry = FilterGeometry.of(weight, conv.groups)
    kept_by_count: dict[int, KeptFilters] = {}
    losses = []
    for choice in choices:
        if choice.keep:
            losses.append(0.0)
            continue
        intrinsic = intrinsic_count(conv.out_channels, choice.ratio, conv.groups)
        if intrinsic not in kept_by_count:  # the kept filters do not depend on dw_size
            kept_by_count[intrinsic] = _kept(weight, geometry, intrinsic // conv.groups)
        kept = kept_by_count[intrinsic]
        sources = slot_source(conv.out_channels, intrinsic)
        draft = draft_from(kept, sources, tuple(conv.stride), tuple(conv.dilation), choice.dw_size)
        losses.append(_assigned_residual(draft, draft.assign()) / energy)
    return losses


def _kept(weight: torch.Tensor, geometry: FilterGeometry, per_group: int) -> KeptFilters:
    """``fit.data_free.choose_kept`` on a geometry already computed."""
    intrinsic = select_intrinsic(geometry, per_group)
    is_ghost = np.ones(weight.shape[0], dtype=bool)
    is_ghost[intrinsic] = False
    device = weight.device
    return KeptFilters(
        weight,
        geometry,
        torch.from_numpy(intrinsic).to(device),
        torch.from_numpy(np.flatnonzero(is_ghost)).to(device),
    )


def _assigned_residual(draft, slot: torch.Tensor) -> float:
    """Total squared residual of the ghosts in their assigned slots, exact: read off the pair
    costs where the pair was fitted, fitted now where it was only bounded (as ``finish_layout``
    fits it)."""
    costs = draft.costs
    source = draft.slot_source[slot]  # position among the kept filters, per ghost
    rows = np.arange(len(source))
    residual = costs.dense[rows, source.numpy()].copy()
    if costs.options.shape[1] == 0:
        missing = torch.arange(len(source))
    else:
        missing = torch.nonzero(~(costs.options == source[:, None]).any(dim=1)).flatten()
    if len(missing):
        weight, device = draft.weight, draft.weight.device
        _, exact = fit_cheap_kernels(
            weight.index_select(0, draft.intrinsic[source[missing].to(device)]),
            weight.index_select(0, draft.ghosts[missing.to(device)]),
            draft.stride,
            draft.dilation,
            draft.dw_size,
            costs.target_sq[missing].to(device),
        )
        residual[missing.numpy()] = exact.clamp_min(0.0).cpu().numpy()
    return float(residual.sum())


@torch.no_grad()
def statistics_losses(
    stats: LayerStatistics,
    conv: nn.Module,
    choices: list[Choice],
    channel_weights: torch.Tensor | None = None,
) -> list[float]:
    """The relative (``channel_weights``-weighted) output error of ``conv`` in each form on the
    activations ``stats`` summed (``stats`` taken at the largest dw_size among ``choices``;
    a smaller cheap kernel's sums are its central taps).

    The layout is chosen as the calibrated fit chooses it: the intrinsic channels greedily
    (facility location, ``fit.data_driven``), then the cheapest balanced assignment of the ghosts
    to slots; the error is that layout's least-squares residual.
    """
    weights = channel_weights
    if weights is None:
        weights = torch.ones_like(stats.target_sq)
    weights = weights.to(stats.target_sq)
    energy = float((stats.target_sq * weights).sum())
    if energy <= 0:
        return [0.0 for _ in choices]
    with_bias = conv.bias is not None
    own = (copy_costs(stats, conv.bias) * weights).cpu().numpy()
    empty = (stats.target_sq * weights).cpu().numpy()
    groups = conv.groups
    counts = [
        intrinsic_count(conv.out_channels, c.ratio, groups) // groups for c in choices if not c.keep
    ]
    costs: dict[int, np.ndarray] = {}
    orders: dict[tuple[int, int], np.ndarray] = {}
    losses = []
    for choice in choices:
        if choice.keep:
            losses.append(0.0)
            continue
        size = choice.dw_size
        if size not in costs:
            costs[size] = pair_fits(central_taps(stats, size), with_bias, weights).cost.numpy()
        per_group = intrinsic_count(conv.out_channels, choice.ratio, groups) // groups
        # One group: the largest count's run holds every smaller count's picks first.
        run = max(counts) if groups == 1 else per_group
        if (size, run) not in orders:
            orders[size, run] = greedy_order(costs[size], own, empty, groups, run)
        kept = np.sort(orders[size, run][: per_group * groups])
        losses.append(_layout_cost(costs[size], own, kept, conv) / energy)
    return losses


class _Sums:
    """The part of ``LayerStatistics`` that ``pair_fits`` and ``copy_costs`` read."""

    def __init__(self, gram: torch.Tensor, cross: torch.Tensor, target_sq: torch.Tensor) -> None:
        self.gram, self.cross, self.target_sq = gram, cross, target_sq


def central_taps(stats: LayerStatistics, dw_size: int) -> _Sums | LayerStatistics:
    """``stats`` restricted to a ``dw_size`` cheap kernel's taps (its centre of ``stats.dw_size``
    taps per dimension), and the constant."""
    if dw_size == stats.dw_size:
        return stats
    dims, big = stats.dims, stats.dw_size
    offset = (big - dw_size) // 2
    grid = np.arange(big**dims).reshape((big,) * dims)
    inner = grid[(slice(offset, offset + dw_size),) * dims].ravel()
    index = torch.from_numpy(np.append(inner, big**dims)).to(stats.gram.device)
    gram = stats.gram.index_select(1, index).index_select(2, index)
    # cross is (sources, taps, targets)
    return _Sums(gram, stats.cross.index_select(1, index), stats.target_sq)


def greedy_order(
    cost: np.ndarray, own: np.ndarray, empty: np.ndarray, groups: int, per_group: int
) -> np.ndarray:
    """The channels facility-location greedy (``fit.data_driven.greedy_intrinsic``) takes as
    intrinsic, ``per_group`` in each group, in the order it takes them.

    With one group the first ``m`` of the order are exactly greedy's choice for ``m`` channels,
    so one run serves every smaller count. Lazy evaluation (the gains only shrink as channels are
    taken: the objective is submodular): a channel's gain is recomputed only when it comes to the
    top, in ``O(channels)``, instead of every gain at every step (``O(channels^2)``): a
    2,048-channel layer in seconds, not minutes.
    """
    channels = cost.shape[0]
    group_of = np.arange(channels) // (channels // groups)
    count = per_group * groups
    current = empty.astype(np.float64).copy()
    chosen = np.zeros(channels, dtype=bool)
    taken = np.zeros(groups, dtype=np.int64)

    def gain(source: int) -> float:
        drop = current - cost[:, source]
        np.clip(drop, 0.0, None, out=drop)
        drop[chosen] = 0.0
        return float(drop.sum() - drop[source] + current[source] - own[source])

    heap = [(-gain(s), s) for s in range(channels)]
    heapq.heapify(heap)
    order: list[int] = []
    while len(order) < count and heap:
        _, source = heapq.heappop(heap)
        if taken[group_of[source]] >= per_group:
            continue
        fresh = gain(source)
        if heap and fresh < -heap[0][0]:
            heapq.heappush(heap, (-fresh, source))
            continue
        order.append(source)
        chosen[source] = True
        taken[group_of[source]] += 1
        np.minimum(current, cost[:, source], out=current)
        current[source] = own[source]
    return np.asarray(order, dtype=np.int64)


def _layout_cost(cost: np.ndarray, own: np.ndarray, kept: np.ndarray, conv: nn.Module) -> float:
    """The weighted error of the layout keeping channels ``kept``, the ghosts assigned to
    balanced slots (as ``fit.data_driven.assign``)."""
    channels = conv.out_channels
    is_ghost = np.ones(channels, dtype=bool)
    is_ghost[kept] = False
    ghosts = np.flatnonzero(is_ghost)
    sources = slot_source(channels, len(kept))
    slot = assign_balanced(torch.from_numpy(cost[np.ix_(ghosts, kept)]), sources)
    source = kept[sources[slot].numpy()]
    return float(cost[ghosts, source].sum() + own[kept].sum())
