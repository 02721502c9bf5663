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
from .data_free import GhostLayout, LayoutDraft, draft_from, finish_layout
from .geometry import FilterGeometry
from .kept_filters import geometry_of, kept_from, select_intrinsic, select_shared
from .pair_costs import PairCosts
from .write import conv_kind, write_layout

# Share when the writers' summed relative residual grows by at most this fraction. Measured
# (benchmarks/shared_layouts.py): x1.01-1.15 on the zoo's random weights, at most x1.03 on the
# trained digits ResNet-18, whose calibrated agreement sharing left unchanged; a gather kept in
# its place costs a pass over the stream's largest maps.
SHARING_TOLERANCE = 0.25


@dataclass(frozen=True)
class SharingFit:
    """What one shared layout costs a group's writers, and whether it was kept.

    ``own`` and ``joint``: each writer's relative filter residual (squared, over its whole
    weight) with its own layout and with the shared one; ``reason`` says why it was decided so.
    """

    shared: bool
    own: tuple[float, ...]
    joint: tuple[float, ...]
    reason: str

    @property
    def cost(self) -> float:
        """The shared layouts' summed residual over the own layouts' (1.0: sharing is free)."""
        own = sum(self.own)
        return sum(self.joint) / own if own > 0 else 1.0


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

    def relative(self, layout: GhostLayout) -> float:
        assert layout.residual is not None
        return float(layout.residual.sum()) / self.energy if self.energy > 0 else 0.0


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
) -> SharingFit:
    """Fit ``ghosts[i]`` to ``originals[i]`` (data-free), with one shared layout when it costs
    at most ``tolerance`` more summed relative residual than each layer's own, else each with
    its own; written into the ghosts. Returns what was measured and decided."""
    writers = []
    for original, ghost in zip(originals, ghosts, strict=True):
        check_conv(original)
        weight = conv_kind(original, ghost).effective_weight(original).detach()
        geometry = geometry_of(weight, ghost.groups)
        energy = float(sum(norms.sum() for norms in geometry.norms_sq))
        writers.append(_Writer(original, ghost, weight, geometry, energy))
    own = [_own_layout(writer) for writer in writers]
    own_residual = tuple(
        writer.relative(layout) for writer, layout in zip(writers, own, strict=True)
    )
    mismatch = _mismatch(ghosts)
    if mismatch is not None:
        _write_all(writers, own)
        return SharingFit(False, own_residual, own_residual, mismatch)
    joint = _shared_layouts(writers)
    joint_residual = tuple(
        writer.relative(layout) for writer, layout in zip(writers, joint, strict=True)
    )
    cost = SharingFit(False, own_residual, joint_residual, "").cost
    shared = cost <= 1.0 + tolerance
    _write_all(writers, joint if shared else own)
    reason = (
        f"one layout costs x{cost:.3f} the writers' own fit residual "
        f"({'within' if shared else 'beyond'} the x{1.0 + tolerance:.2f} allowed)"
    )
    return SharingFit(shared, own_residual, joint_residual, reason)


def _residuals(writers: list[_Writer], layouts: list[GhostLayout]) -> tuple[float, ...]:
    return tuple(writer.relative(layout) for writer, layout in zip(writers, layouts, strict=True))


def _own_layout(writer: _Writer) -> GhostLayout:
    ghost = writer.ghost
    intrinsic = select_intrinsic(writer.geometry, ghost.intrinsic_channels // ghost.groups)
    draft = writer.draft(intrinsic)
    return finish_layout(draft, draft.assign())


def _shared_layouts(writers: list[_Writer]) -> list[GhostLayout]:
    ghost = writers[0].ghost
    scales = [1.0 / writer.energy if writer.energy > 0 else 0.0 for writer in writers]
    if not any(scales):
        scales = [1.0] * len(writers)
    per_group = ghost.intrinsic_channels // ghost.groups
    intrinsic = select_shared([writer.geometry for writer in writers], per_group, scales)
    drafts = [writer.draft(intrinsic) for writer in writers]
    slot = assign_balanced(
        SummedCosts([draft.costs for draft in drafts], scales), ghost.slot_source
    )
    return [finish_layout(draft, slot) for draft in drafts]


def _write_all(writers: list[_Writer], layouts: list[GhostLayout]) -> None:
    for writer, layout in zip(writers, layouts, strict=True):
        kind = conv_kind(writer.original, writer.ghost)
        write_layout(writer.original, writer.ghost, kind, writer.ghost.slot_source, layout)
