"""The fit residual of every (ghost filter, kept filter) pair: the slot assignment's costs."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from .geometry import FilterGeometry
from .kernels import as_float, correlations, option_correlations, reach_of, solve_kernels
from .kernels_nd import fit_cheap_kernels_nd

# Multiply-adds allowed for trying alternative ghost sources in one layer.
_WORK_BUDGET = 4 * 10**9


def similarity_sq(
    geometry: FilterGeometry, intrinsic: torch.Tensor, ghosts: torch.Tensor
) -> torch.Tensor:
    """Squared cosine between each ghost filter and each kept filter, ``(ghosts, intrinsic)`` on
    the CPU, in the geometry's precision; -1 across groups (a filter of another group sees other
    inputs)."""
    size = geometry.per_group_out
    ghosts, intrinsic = ghosts.cpu().numpy(), intrinsic.cpu().numpy()
    if len(geometry.cosines) == 1:
        return torch.from_numpy(geometry.cosines[0].pairs(ghosts, intrinsic))
    dtype = geometry.cosines[0].matrix.dtype
    result = np.full((len(ghosts), len(intrinsic)), -1.0, dtype=dtype)
    for group, cosines in enumerate(geometry.cosines):
        # Both index lists are sorted, so each group's rows and columns are contiguous.
        rows = np.searchsorted(ghosts, [group * size, (group + 1) * size])
        cols = np.searchsorted(intrinsic, [group * size, (group + 1) * size])
        local_rows = ghosts[rows[0] : rows[1]] - group * size
        local_cols = intrinsic[cols[0] : cols[1]] - group * size
        result[rows[0] : rows[1], cols[0] : cols[1]] = cosines.pairs(local_rows, local_cols)
    return torch.from_numpy(result)


@dataclass
class PairCosts:
    """Fit residual of every (ghost filter, kept filter) pair, exact where it was fitted.

    ``cost[g, s]`` is the squared residual of the best depthwise fit of ghost ``g`` from kept
    filter ``s``: exact for each ghost's most similar candidates (``options[g]``, fitted kernels
    in ``kernels[g]``), and elsewhere the residual of the centre-tap fit (a scaled copy),
    ``target_sq[g] * (1 - similar[g, s])``, which bounds the exact one from above. Pairs across
    groups cost more than any pair inside one. The matrix is built a block of rows at a time
    (``rows``, what the slot assignment reads) or whole (``cost``).
    """

    similar: np.ndarray  # (ghosts, intrinsic): squared cosines; -1 marks pairs across groups
    options: torch.Tensor  # (ghosts, candidates): positions in intrinsic, on the CPU
    kernels: torch.Tensor  # (ghosts, candidates, dw, dw), float64
    residual: np.ndarray  # (ghosts, candidates): the options' exact residuals, float64, >= 0
    target_sq: torch.Tensor  # (ghosts,): the ghost filters' squared norms, float64, on the CPU
    groups: int  # the layer's groups; the filters of one group see only its inputs

    @property
    def shape(self) -> tuple[int, int]:
        return self.similar.shape

    def rows(self, block: slice) -> np.ndarray:
        """Rows ``block`` of the cost matrix, float64 (built for them alone, in one group)."""
        if self.groups > 1:
            return self.dense[block]
        return self._fitted(self._bounds(self.similar[block], block), block)

    @cached_property
    def dense(self) -> np.ndarray:
        """The whole cost matrix, float64."""
        if self.groups == 1:
            return self.rows(slice(None))
        whole = slice(None)
        cost = self._bounds(np.maximum(self.similar, 0.0), whole)
        across = cost.max() * 4 + self.target_sq.numpy()[:, None] + 1.0
        return self._fitted(np.where(self.similar < 0, across, cost), whole)

    def _bounds(self, similar: np.ndarray, block: slice) -> np.ndarray:
        """The scaled-copy residuals ``target_sq * (1 - similar)`` of rows ``block``."""
        # (similar - 1) * -target_sq is (1 - similar) * target_sq bit for bit (negations are
        # exact), in faster numpy loops than a float32 array subtracted from a float64 scalar.
        cost = similar.astype(np.float64)
        cost -= 1.0
        cost *= -self.target_sq.numpy()[block, None]
        return cost

    def _fitted(self, cost: np.ndarray, block: slice) -> np.ndarray:
        """``cost`` (rows ``block``) with the exact residuals where kernels were fitted."""
        if self.residual.shape[1]:
            np.put_along_axis(cost, self.options.numpy()[block], self.residual[block], axis=1)
        return cost

    @property
    def cost(self) -> torch.Tensor:
        """The whole cost matrix ``(ghosts, intrinsic)``, float64, on the CPU."""
        return torch.from_numpy(self.dense)


def pair_costs(
    weight: torch.Tensor,
    geometry: FilterGeometry,
    intrinsic: torch.Tensor,
    ghosts: torch.Tensor,
    stride: tuple[int, int],
    dilation: tuple[int, int],
    dw_size: int,
    candidates: int = 8,
) -> PairCosts:
    """Residuals of fitting every ghost filter from every kept filter (see ``PairCosts``)."""
    groups = len(geometry.cosines)
    cos_sq = similarity_sq(geometry, intrinsic, ghosts)
    target_sq = _squared_norms(weight, geometry, ghosts)
    # Each candidate costs one filter-sized correlation per shift: keep big layers affordable.
    work = len(ghosts) * weight[0].numel() * (2 * dw_size - 1) ** 2
    candidates = max(1, min(candidates, _WORK_BUDGET // max(1, work)))
    count = min(candidates, len(intrinsic) // groups)  # never reach into another group
    reach = reach_of(tuple(weight.shape[2:]), stride, dilation, dw_size)
    if geometry.exact and not any(reach):
        # Shifted copies of these filters never overlap, so the best kernel is the centre tap
        # alone and the scaled-copy residuals are already the exact costs.
        count = 0
    options = cos_sq.topk(count, dim=1).indices
    kernels, residual = _fit_options(
        weight, intrinsic, ghosts, target_sq, options, stride, dilation, dw_size
    )
    residual = residual.cpu().clamp_min(0.0).numpy()
    return PairCosts(cos_sq.numpy(), options, kernels, residual, target_sq, groups)


def _squared_norms(
    weight: torch.Tensor, geometry: FilterGeometry, rows: torch.Tensor
) -> torch.Tensor:
    """Squared norms of filters ``rows``, float64 on the CPU: the geometry's when it compared
    the exact filters (no second pass over them), computed here when it used a projection."""
    if geometry.exact:
        return torch.from_numpy(np.concatenate(geometry.norms_sq).take(rows.cpu().numpy()))
    flat = weight.reshape(weight.shape[0], -1)[rows]
    return torch.linalg.vector_norm(as_float(flat), dim=1).double().square_().cpu()


def _fit_options(
    weight: torch.Tensor,
    intrinsic: torch.Tensor,
    ghosts: torch.Tensor,
    target_sq: torch.Tensor,
    options: torch.Tensor,
    stride: tuple[int, int],
    dilation: tuple[int, int],
    dw_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernels ``(n, count, dw, dw)`` and residuals ``(n, count)`` of ghost ``g`` from each of
    ``options[g]``, given the ghosts' squared norms ``target_sq``. A kept filter's correlations
    with itself are computed once, not per pair."""
    n, count = options.shape
    spatial = (dw_size,) * (weight.dim() - 2)
    if count == 0:
        empty = torch.zeros(n, 0, dtype=torch.float64, device=weight.device)
        return empty.view(n, 0, *[1] * len(spatial)).expand(n, 0, *spatial), empty
    if weight.dim() != 4:  # Conv1d / Conv3d filters: the generic N-d fit, pair by pair
        pick = options.flatten().to(weight.device)
        kernels, residual = fit_cheap_kernels_nd(
            weight[intrinsic][pick],
            weight[ghosts].repeat_interleave(count, dim=0),
            stride,
            dilation,
            dw_size,
        )
        return kernels.view(n, count, *spatial), residual.view(n, count)
    kept = as_float(weight.index_select(0, intrinsic))  # 3x faster than weight[intrinsic]
    targets = weight.index_select(0, ghosts).to(kept.dtype)
    reach = reach_of(tuple(weight.shape[2:]), stride, dilation, dw_size)
    pick = options.flatten().to(weight.device)
    auto = correlations(kept, kept, reach)[pick]
    cross = option_correlations(kept, targets, options.to(weight.device), reach)
    target_sq = target_sq.to(weight.device).repeat_interleave(count)
    kernels, residual = solve_kernels(auto, cross, target_sq, stride, dilation, dw_size, reach)
    return kernels.view(n, count, dw_size, dw_size), residual.view(n, count)
