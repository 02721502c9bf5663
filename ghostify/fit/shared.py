"""One layout for the layers that write into one channel group (a residual stream).

Layers whose outputs meet channel by channel (``ghostify.surgery.coupling``) need their channels
in one order for the stream to run without a gather. A GhostModule's order follows from its
layout (which positions are intrinsic, which slot each ghost takes), so the writers of a group
share one layout. Each writer keeps its own trained filters at the shared intrinsic positions and
fits its own cheap kernels; only the positions and the pairing are common, chosen jointly: the
greedy selection on the writers' summed residuals (``select_shared``), the slot assignment on
their summed pair costs, each writer weighted by one over its filters' energy so that every
layer counts by its relative error.

Sharing costs fit quality. ``fit_group`` fits both ways and keeps the shared layouts only when
their summed relative residual is within ``SHARING_TOLERANCE`` of the writers' own layouts'
(which then each gather their outputs into the group's order, or have it folded for one of them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..layers.ghost_module import GhostModule, check_conv
from .assignment import assign_balanced
from .data_driven import (
    PairFits,
    assign,
    copy_costs,
    greedy_intrinsic,
    install,
    layout_cost,
    pair_fits,
)
from .data_free import GhostLayout, LayoutDraft, draft_from, finish_layout
from .geometry import FilterGeometry
from .kept_filters import geometry_of, kept_from, select_intrinsic, select_shared
from .pair_costs import PairCosts, similarity_sq
from .statistics import LayerStatistics
from .write import conv_kind, write_layout

# Share when the writers' summed relative residual grows by at most this fraction. Measured
# (benchmarks/shared_layouts.py): x1.01-1.15 on the zoo's random weights, at most x1.03 on the
# trained digits ResNet-18, whose calibrated agreement sharing left unchanged; a gather kept in
# its place costs a pass over the stream's largest maps.
SHARING_TOLERANCE = 0.25


@dataclass(frozen=True)
class SharingFit:
    """What one shared layout costs a group's writers, and whether it was kept.

    ``own`` and ``joint``: each writer's relative residual (squared, over its whole weight)
    with its own kept filters and with the shared ones, every other filter taken as the best
    scaled copy of a kept one: what the selections minimise, and the decision's basis. With
    ``fit_group(..., exact=True)``, ``exact_own`` and ``exact_joint`` are the residuals of the
    fitted layouts both ways (balanced slots, fitted kernels); None otherwise.
    """

    shared: bool
    own: tuple[float, ...]
    joint: tuple[float, ...]
    reason: str
    exact_own: tuple[float, ...] | None = None
    exact_joint: tuple[float, ...] | None = None

    @property
    def cost(self) -> float:
        """The shared layout's summed residual over the own ones' (1.0: sharing is free)."""
        return _ratio(self.joint, self.own)

    @property
    def exact_cost(self) -> float | None:
        """``cost`` of the fitted layouts (``exact=True``), else None."""
        if self.exact_own is None or self.exact_joint is None:
            return None
        return _ratio(self.exact_joint, self.exact_own)


def _ratio(joint: tuple[float, ...], own: tuple[float, ...]) -> float:
    return sum(joint) / sum(own) if sum(own) > 0 else 1.0


class SummedCosts:
    """Several layers' pair costs summed with weights, as the slot assignment reads them."""

    def __init__(self, costs: Sequence[PairCosts], scales: Sequence[float]) -> None:
        self.costs, self.scales = list(costs), list(scales)
        self.shape = self.costs[0].shape

    def rows(self, block: slice) -> np.ndarray:
        total = self.costs[0].rows(block) * self.scales[0]
        for costs, scale in zip(self.costs[1:], self.scales[1:], strict=True):
            total += costs.rows(block) * scale
        return total

    @property
    def dense(self) -> np.ndarray:
        return self.rows(slice(None))


@dataclass
class _Writer:
    original: nn.Module
    ghost: GhostModule
    weight: torch.Tensor
    geometry: FilterGeometry
    energy: float  # the filters' summed squares

    def draft(self, intrinsic: np.ndarray) -> LayoutDraft:
        ghost = self.ghost
        kept = kept_from(self.weight, self.geometry, intrinsic)
        return draft_from(kept, ghost.slot_source, ghost.stride, ghost.dilation, ghost.dw_size)

    def layout(self, intrinsic: np.ndarray) -> GhostLayout:
        """This writer's own layout around the kept filters ``intrinsic``."""
        draft = self.draft(intrinsic)
        return finish_layout(draft, draft.assign())

    def relative(self, layout: GhostLayout) -> float:
        assert layout.residual is not None
        return float(layout.residual.sum()) / self.energy if self.energy > 0 else 0.0

    def copy_residual(self, intrinsic: np.ndarray) -> float:
        """Relative residual with every other filter the best scaled copy of a kept one."""
        kept = kept_from(self.weight, self.geometry, intrinsic)
        similar = similarity_sq(self.geometry, kept.intrinsic, kept.ghosts).numpy()
        best = similar.max(axis=1).astype(np.float64) if similar.shape[1] else 0.0
        norms = np.concatenate(self.geometry.norms_sq).take(kept.ghosts.cpu().numpy())
        left = float((norms * (1.0 - np.clip(best, 0.0, 1.0))).sum())
        return left / self.energy if self.energy > 0 else 0.0


def _mismatch(ghosts: Sequence[GhostModule]) -> str | None:
    """Why these GhostModules cannot compute their channels in one layout, or None."""
    first = ghosts[0]
    for ghost in ghosts[1:]:
        for attribute in ("dims", "out_channels", "intrinsic_channels", "multiplier", "groups"):
            if getattr(ghost, attribute) != getattr(first, attribute):
                return f"the writers' {attribute} differ"
    return None


@torch.no_grad()
def fit_group(
    originals: Sequence[nn.Module],
    ghosts: Sequence[GhostModule],
    tolerance: float = SHARING_TOLERANCE,
    *,
    exact: bool = False,
) -> SharingFit:
    """Fit ``ghosts[i]`` to ``originals[i]`` (data-free), with one shared layout when it costs
    at most ``tolerance`` more summed relative residual than each layer's own, else each with
    its own; written into the ghosts. Returns what was measured and decided.

    The decision compares the selections' residuals (``SharingFit``), so only the layouts kept
    are assigned and fitted; ``exact=True`` also fits the others, to report both exactly.
    """
    writers = []
    for original, ghost in zip(originals, ghosts, strict=True):
        check_conv(original)
        weight = conv_kind(original, ghost).effective_weight(original).detach()
        geometry = geometry_of(weight, ghost.groups)
        energy = float(sum(norms.sum() for norms in geometry.norms_sq))
        writers.append(_Writer(original, ghost, weight, geometry, energy))
    own_kept = [
        select_intrinsic(w.geometry, w.ghost.intrinsic_channels // w.ghost.groups) for w in writers
    ]
    own = tuple(w.copy_residual(kept) for w, kept in zip(writers, own_kept, strict=True))
    mismatch = _mismatch(ghosts)
    if mismatch is not None:
        _write_all(writers, [w.layout(kept) for w, kept in zip(writers, own_kept, strict=True)])
        return SharingFit(False, own, own, mismatch)
    scales = [1.0 / w.energy if w.energy > 0 else 0.0 for w in writers]
    scales = scales if any(scales) else [1.0] * len(writers)
    ghost = writers[0].ghost
    shared_kept = select_shared(
        [w.geometry for w in writers], ghost.intrinsic_channels // ghost.groups, scales
    )
    joint = tuple(w.copy_residual(shared_kept) for w in writers)
    cost = _ratio(joint, own)
    shared = cost <= 1.0 + tolerance
    reason = (
        f"one layout costs x{cost:.3f} the writers' own kept filters' residual "
        f"({'within' if shared else 'beyond'} the x{1.0 + tolerance:.2f} allowed)"
    )
    layouts: dict[bool, list[GhostLayout]] = {}
    if shared or exact:
        layouts[True] = _shared_layouts(writers, shared_kept, scales)
    if not shared or exact:
        layouts[False] = [w.layout(kept) for w, kept in zip(writers, own_kept, strict=True)]
    _write_all(writers, layouts[shared])
    if not exact:
        return SharingFit(shared, own, joint, reason)
    exact_own, exact_joint = (_relative(writers, layouts[key]) for key in (False, True))
    return SharingFit(shared, own, joint, reason, exact_own, exact_joint)


def _relative(writers: list[_Writer], layouts: list[GhostLayout]) -> tuple[float, ...]:
    return tuple(w.relative(layout) for w, layout in zip(writers, layouts, strict=True))


def _shared_layouts(
    writers: list[_Writer], intrinsic: np.ndarray, scales: list[float]
) -> list[GhostLayout]:
    """Every writer's layout with the kept positions ``intrinsic`` and one slot assignment."""
    drafts = [writer.draft(intrinsic) for writer in writers]
    costs = SummedCosts([draft.costs for draft in drafts], scales)
    slot = assign_balanced(costs, writers[0].ghost.slot_source)
    return [finish_layout(draft, slot) for draft in drafts]


def _write_all(writers: list[_Writer], layouts: list[GhostLayout]) -> None:
    for writer, layout in zip(writers, layouts, strict=True):
        kind = conv_kind(writer.original, writer.ghost)
        write_layout(writer.original, writer.ghost, kind, writer.ghost.slot_source, layout)


@dataclass
class _Observed:
    """One writer's costs on its activations, each scaled by one over its output energy."""

    original: nn.Module
    ghost: GhostModule
    fits: PairFits  # every (ghost, source) pair's weighted residual, and its kernel
    own: torch.Tensor  # each channel computed by the primary conv
    empty: torch.Tensor  # each channel left at zero
    scale: float

    @classmethod
    def of(
        cls,
        original: nn.Module,
        ghost: GhostModule,
        sums: LayerStatistics,
        weights: torch.Tensor | None,
    ) -> _Observed:
        if weights is None:
            weights = torch.ones(original.out_channels, dtype=torch.float64)
        weights = weights.to(sums.target_sq.device, torch.float64)
        fits = pair_fits(sums, original.bias is not None, weights)
        own = (copy_costs(sums, original.bias) * weights).cpu()
        empty = (sums.target_sq * weights).cpu()
        energy = float(empty.sum())
        return cls(original, ghost, fits, own, empty, 1.0 / energy if energy > 0 else 0.0)

    def cost(self, layout: GhostLayout) -> float:
        return layout_cost(layout, self.fits, self.own, self.ghost) * self.scale

    def own_layout(self) -> GhostLayout:
        ghost = self.ghost
        per_group = ghost.intrinsic_channels // ghost.groups
        kept = greedy_intrinsic(self.fits.cost, self.own, self.empty, ghost.groups, per_group)
        return assign(kept, self.fits, ghost, ghost.out_channels)


@torch.no_grad()
def share_on_statistics(
    originals: Sequence[nn.Module],
    ghosts: Sequence[GhostModule],
    stats: Sequence[LayerStatistics],
    weights: Sequence[torch.Tensor | None],
    tolerance: float = SHARING_TOLERANCE,
) -> SharingFit:
    """``fit_group``'s decision again, on what the writers really see: each writer's own
    layout and one shared layout are chosen on its activations (``stats``: sums on the original
    model; ``data_driven``'s greedy selection and balanced assignment, on the writers' summed
    costs for the shared one, each relative to its output energy; ``weights`` per output
    channel, as a calibration weights them). The shared layout, its kernels fitted on the
    activations, is installed in ``ghosts`` when it costs at most ``tolerance`` more than the
    own ones; otherwise ``ghosts`` are left as they are (a calibration chooses each one's).
    """
    writers = [
        _Observed.of(original, ghost, sums, channel_weights)
        for original, ghost, sums, channel_weights in zip(
            originals, ghosts, stats, weights, strict=True
        )
    ]
    own = tuple(writer.cost(writer.own_layout()) for writer in writers)
    first = ghosts[0]
    summed = PairFits(sum(w.fits.cost * w.scale for w in writers), torch.empty(0))
    kept = greedy_intrinsic(
        summed.cost,
        sum(w.own * w.scale for w in writers),
        sum(w.empty * w.scale for w in writers),
        first.groups,
        first.intrinsic_channels // first.groups,
    )
    layout = assign(kept, summed, first, first.out_channels)
    joint = tuple(writer.cost(layout) for writer in writers)
    cost = _ratio(joint, own)
    shared = cost <= 1.0 + tolerance
    if shared:
        for writer in writers:
            install(writer.original, writer.ghost, layout, writer.fits, None)
    reason = (
        f"on the calibration data, one layout costs x{cost:.3f} the writers' own "
        f"({'within' if shared else 'beyond'} the x{1.0 + tolerance:.2f} allowed)"
    )
    return SharingFit(shared, own, joint, reason)
