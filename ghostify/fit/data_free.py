"""Data-free fitting of a GhostModule to a trained convolution's filters.

The primary convolution keeps a subset of the original filters unchanged ("intrinsic" channels), so
those output channels are reproduced exactly. Every other filter becomes a "ghost" channel: a
depthwise kernel applied to one intrinsic channel's output, fitted by least squares to the original
filter (``kernels.py``). No data is needed, only the weights. Which filters to keep
(``kept_filters.py``) and which kept filter feeds each ghost (``pair_costs.py`` and
``assignment.py``) are decided from the filters' cosines, per group (``geometry.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .assignment import assign_balanced
from .kept_filters import KeptFilters
from .kernels import fit_cheap_kernels
from .pair_costs import PairCosts, pair_costs


@dataclass
class GhostLayout:
    """A data-free fit: which filters are kept, where each ghost goes, and its kernel."""

    intrinsic: torch.Tensor  # original channel of each primary output, (m,)
    ghosts: torch.Tensor  # original channel of each ghost, (n,)
    slot: torch.Tensor  # cheap-conv slot of each ghost, (n,)
    kernels: torch.Tensor  # depthwise kernel of each ghost, (n, dw, dw)
    # Squared residual of each ghost's fit to its filter, float64 on the CPU (when known).
    residual: torch.Tensor | None = None


@dataclass
class LayoutDraft:
    """A layer's fit up to its slot assignment: the kept filters, the ghosts, the pair costs."""

    weight: torch.Tensor
    intrinsic: torch.Tensor
    ghosts: torch.Tensor
    costs: PairCosts
    slot_source: torch.Tensor  # on the CPU
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    dw_size: int

    def assign(self) -> torch.Tensor:
        """The slot of each ghost (``assign_balanced``); needs nothing but the draft, so it can
        run in another thread (lapjv and scipy release the GIL) while the next layer is drafted."""
        return assign_balanced(self.costs, self.slot_source)


def draft_from(
    kept: KeptFilters,
    slot_source: torch.Tensor,
    stride: tuple[int, ...],
    dilation: tuple[int, ...],
    dw_size: int,
) -> LayoutDraft:
    """Cost every (ghost, kept filter) pair of a layer whose kept filters are chosen."""
    weight, intrinsic, ghosts = kept.weight, kept.intrinsic, kept.ghosts
    costs = pair_costs(weight, kept.geometry, intrinsic, ghosts, stride, dilation, dw_size)
    return LayoutDraft(
        weight, intrinsic, ghosts, costs, slot_source.cpu(), stride, dilation, dw_size
    )


def finish_layout(draft: LayoutDraft, slot: torch.Tensor) -> GhostLayout:
    """The kernel of each ghost for its slot: fitted already when the pair was among the
    ghost's candidates, fitted now otherwise."""
    weight, intrinsic, ghosts, costs = draft.weight, draft.intrinsic, draft.ghosts, draft.costs
    source = draft.slot_source[slot]
    spatial = (draft.dw_size,) * (weight.dim() - 2)  # Conv1d/2d/3d filters
    if costs.options.shape[1] == 0:  # no candidate was fitted (pointwise filters): fit them all
        missing = torch.arange(len(ghosts))
        kernels = torch.empty(len(ghosts), *spatial, dtype=torch.float64, device=weight.device)
        residual = torch.empty(len(ghosts), dtype=torch.float64)
    else:
        match = costs.options == source[:, None]
        found = match.any(dim=1)
        kernels = torch.zeros(len(ghosts), *spatial, dtype=torch.float64, device=weight.device)
        rows = torch.nonzero(found).flatten()
        residual = torch.zeros(len(ghosts), dtype=torch.float64)
        if len(rows):
            column = match[rows].to(torch.uint8).argmax(dim=1)
            kernels[rows] = costs.kernels[rows, column]
            residual[rows] = torch.from_numpy(costs.residual[rows.numpy(), column.numpy()])
        missing = torch.nonzero(~found).flatten()
    if len(missing):
        on_device = missing.to(weight.device)
        fitted, left = fit_cheap_kernels(
            weight.index_select(0, intrinsic[source[missing].to(weight.device)]),
            weight.index_select(0, ghosts[on_device]),
            draft.stride,
            draft.dilation,
            draft.dw_size,
            costs.target_sq[missing].to(weight.device),
        )
        kernels[missing] = fitted.to(kernels.device, kernels.dtype)
        residual[missing] = left.cpu().double().clamp_min(0.0)
    return GhostLayout(intrinsic, ghosts, slot.to(weight.device), kernels, residual)
