"""Data-free fitting of a GhostModule to a trained convolution's filters.

The primary convolution keeps a subset of the original filters unchanged ("intrinsic" channels), so
those output channels are reproduced exactly. Every other filter becomes a "ghost" channel: a
depthwise kernel applied to one intrinsic channel's output, fitted by least squares to the original
filter (``kernels.py``). No data is needed, only the weights. Which filters to keep and which kept
filter feeds each ghost are decided from the filters' cosines, per group, computed once and only
for the kept filters' rows (``GroupCosines``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache

import numpy as np
import torch

from .assignment import assign_balanced
from .kernels import (
    as_float,
    correlations,
    fit_cheap_kernels,
    option_correlations,
    reach_of,
    solve_kernels,
)
from .kernels_nd import fit_cheap_kernels_nd

# Multiply-adds allowed for trying alternative ghost sources in one layer.
_WORK_BUDGET = 4 * 10**9
# Filters longer than this may be compared through a random projection of this size.
_SKETCH_DIM = 512
# Rows of the cosine matrix computed at once past the first panel (see GroupCosines).
_PANEL = 16


@lru_cache(maxsize=2)
def _sketch(length: int, dtype: torch.dtype) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(length, _SKETCH_DIM, generator=generator, dtype=dtype)


def _working_rows(rows: torch.Tensor) -> torch.Tensor:
    """The filters as float rows for similarity search (half precision is too coarse).

    The Gram matrix of ``r`` filters of length ``d`` costs ``r^2 d / 2`` multiply-adds. When
    ``r`` is large and ``d`` very long, projecting onto ``_SKETCH_DIM`` fixed random directions
    first is cheaper and keeps inner products, norms and cosines up to a few percent
    (Johnson-Lindenstrauss); otherwise the exact filters are compared. The projection is seeded,
    so conversions stay deterministic; the least-squares fits always use the exact filters.
    """
    rows = as_float(rows)
    count, length = rows.shape
    sketched_cost = count * length * _SKETCH_DIM + count * count * _SKETCH_DIM // 2
    if length <= _SKETCH_DIM or sketched_cost >= count * count * length // 2:
        return rows
    return rows @ _sketch(length, rows.dtype).to(rows.device) / _SKETCH_DIM**0.5


class GroupCosines:
    """Squared cosines between one group's filters, row by row as the selection needs them.

    Keeping ``k`` of ``r`` filters reads only the kept filters' rows (the selection, then the
    pair costs), so the matrix is computed in row panels, the filters in decreasing norm order:
    the greedy selection picks strong filters first (on randomly initialised ResNet-50 its
    ``k = r/2`` picks lie within the first 52-57% of that order). The first panel, rows
    ``[0, k)``, is one symmetric product (BLAS ``syrk``) for its square block and one general
    product for the rest of its rows. A pick further down the order adds a panel up to it (and
    ``_PANEL`` rows more), computed against the columns not covered yet and completed from the
    panels before (the matrix is symmetric). For ``k = r/2`` that is 3/8 of ``r^2`` products
    instead of the 1/2 of one ``syrk`` over all rows: 0.6-0.7 of its time, the general product
    being the faster. ``position[f]`` is filter ``f``'s row; rows ``[0, done)`` of ``matrix``
    are complete.
    """

    def __init__(self, rows: torch.Tensor) -> None:
        norms = torch.linalg.vector_norm(rows, dim=1)  # 10x faster than in float64
        self.norms_sq = np.square(norms.cpu().numpy(), dtype=np.float64)  # filter order
        self.order = np.argsort(-self.norms_sq, kind="stable")
        self.position = np.empty_like(self.order)
        self.position[self.order] = np.arange(len(self.order))
        # 1 / sqrt in float64 is what torch's rsqrt computes: the same unit rows to the last bit.
        inverse = np.zeros_like(self.norms_sq)
        np.divide(1.0, np.sqrt(self.norms_sq), out=inverse, where=self.norms_sq > 0)
        if rows.device.type != "cpu":  # one product on the accelerator, all rows at once
            index = torch.from_numpy(self.order).to(rows.device)
            scale = torch.from_numpy(inverse[self.order]).to(rows.device, rows.dtype)
            unit = rows.index_select(0, index) * scale[:, None]
            self.matrix = (unit @ unit.T).square_().cpu().numpy()
            self.done = len(self.order)  # every row: complete() has nothing left to do
            return
        unit = rows.numpy().take(self.order, axis=0)
        unit *= inverse.astype(unit.dtype).take(self.order)[:, None]
        self.unit = unit
        self.matrix = np.empty((len(unit), len(unit)), dtype=unit.dtype)
        self.done = 0

    def complete(self, count: int) -> None:
        """Make rows ``[0, count)`` complete: one panel of rows ``[done, count)``."""
        start, stop = self.done, min(count, len(self.order))
        if stop <= start:
            return
        unit, matrix = self.unit, self.matrix
        panel = unit[start:stop]
        np.matmul(panel, panel.T, out=matrix[start:stop, start:stop])  # syrk
        np.matmul(panel, unit[stop:].T, out=matrix[start:stop, stop:])
        np.square(matrix[start:stop, start:], out=matrix[start:stop, start:])
        matrix[start:stop, :start] = matrix[:start, start:stop].T
        self.done = stop

    def pairs(self, filters: np.ndarray, kept: np.ndarray) -> np.ndarray:
        """The squared cosines of ``filters`` with the filters ``kept``, as a
        ``(len(filters), len(kept))`` array: read from the kept filters' rows, the ones the
        selection computed."""
        at = self.position.take(kept)
        if len(at):
            self.complete(int(at.max()) + 1)
        where = self.position.take(filters)
        # torch: two gathers and a blocked transpose, each one call that frees the GIL (numpy
        # took 1.3x the time, in strips of a few rows holding the GIL between them).
        rows = torch.from_numpy(self.matrix).index_select(0, torch.from_numpy(at))
        return rows.index_select(1, torch.from_numpy(where)).T.contiguous().numpy()


@dataclass
class FilterGeometry:
    """Squared norms and squared cosines of a layer's filters, group by group.

    The cosines are all the selection, the similarity search and the first cost estimates need;
    their rows are computed as the selection reads them (``GroupCosines``).
    """

    per_group_out: int
    cosines: list[GroupCosines]
    exact: bool  # False when some group was compared through a random projection

    @property
    def norms_sq(self) -> list[np.ndarray]:
        """Per group, the filters' squared norms ``(per_group_out,)``, float64."""
        return [group.norms_sq for group in self.cosines]

    @classmethod
    def of(cls, weight: torch.Tensor, groups: int) -> FilterGeometry:
        flat = weight.reshape(weight.shape[0], -1)
        per_group_out = weight.shape[0] // groups
        cosines, exact = [], True
        for group in range(groups):
            group_rows = flat[group * per_group_out : (group + 1) * per_group_out]
            rows = _working_rows(group_rows)
            exact = exact and rows.shape[1] == group_rows.shape[1]
            cosines.append(GroupCosines(rows))
        return cls(per_group_out, cosines, exact)


def select_intrinsic(geometry: FilterGeometry, per_group: int) -> np.ndarray:
    """Choose ``per_group`` filters in each group to keep exactly; returns original indices,
    sorted.

    Greedy farthest-point selection: take the filter the current set explains worst, where a set
    explains a filter by its best scaled copy (residual ``|w|^2 (1 - max cos^2)``). This is cheap
    (one row of cosines per kept filter) and spreads the kept filters over the directions that
    matter. Ties go to the filter of larger norm, then to the lower index.
    """
    chosen: list[np.ndarray] = []
    multiply, subtract, minimum = np.multiply, np.subtract, np.minimum
    for group, cosines in enumerate(geometry.cosines):
        # At least per_group rows are read: computed as one panel (see GroupCosines).
        cosines.complete(per_group)
        cos_sq = cosines.matrix  # filters in norm order from here on
        # The loop runs once per kept filter: numpy makes each small step ~100x cheaper than
        # torch, working in the cosines' precision (no casts) another 40%.
        norms = cosines.norms_sq.take(cosines.order).astype(cos_sq.dtype)
        residual = norms.copy()
        argmax = residual.argmax
        left = np.empty_like(residual)
        picked = np.zeros(per_group, dtype=np.int64)
        for step in range(per_group):
            best = argmax()
            if best >= cosines.done:
                cosines.complete(best + _PANEL)
            picked[step] = best
            # What is left of every filter g once filter ``best`` is kept: |g|^2 (1 - cos^2).
            multiply(cos_sq[best], norms, out=left)
            subtract(norms, left, out=left)
            minimum(residual, left, out=residual)
            residual[best] = -1.0  # never pick a filter twice
        kept = cosines.order.take(picked)
        kept.sort()
        chosen.append(kept + group * geometry.per_group_out)
    return np.concatenate(chosen)


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


@dataclass
class GhostLayout:
    """A data-free fit: which filters are kept, where each ghost goes, and its kernel."""

    intrinsic: torch.Tensor  # original channel of each primary output, (m,)
    ghosts: torch.Tensor  # original channel of each ghost, (n,)
    slot: torch.Tensor  # cheap-conv slot of each ghost, (n,)
    kernels: torch.Tensor  # depthwise kernel of each ghost, (n, dw, dw)


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


@dataclass
class KeptFilters:
    """A layer's filters split into the kept ones and the ghosts, with their geometry."""

    weight: torch.Tensor
    geometry: FilterGeometry
    intrinsic: torch.Tensor  # original indices of the kept filters, sorted per group
    ghosts: torch.Tensor  # original indices of every other filter, sorted


def choose_kept(weight: torch.Tensor, groups: int, intrinsic_channels: int) -> KeptFilters:
    """Compare the filters (one Gram matrix per group) and choose the ones to keep."""
    geometry = FilterGeometry.of(weight, groups)
    # A NaN or infinite weight makes its filter's norm NaN or infinite too: checked on the
    # norms, as a pass over every weight would cost a tenth of a conversion.
    if not all(np.isfinite(norms).all() for norms in geometry.norms_sq):
        bad = int((~torch.isfinite(weight)).sum())
        what = f"{bad} NaN or infinite value(s)" if bad else "values whose squares overflow"
        raise ValueError(
            f"the weight has {what} of {weight.numel()}: the data-free fit needs finite weights "
            "(init='scratch' does not fit)"
        )
    intrinsic = select_intrinsic(geometry, intrinsic_channels // groups)
    is_ghost = np.ones(weight.shape[0], dtype=bool)
    is_ghost[intrinsic] = False
    ghosts = np.flatnonzero(is_ghost)
    return KeptFilters(
        weight,
        geometry,
        torch.from_numpy(intrinsic).to(weight.device),
        torch.from_numpy(ghosts).to(weight.device),
    )


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
    else:
        match = costs.options == source[:, None]
        found = match.any(dim=1)
        kernels = torch.zeros(len(ghosts), *spatial, dtype=torch.float64, device=weight.device)
        rows = torch.nonzero(found).flatten()
        if len(rows):
            kernels[rows] = costs.kernels[rows, match[rows].to(torch.uint8).argmax(dim=1)]
        missing = torch.nonzero(~found).flatten()
    if len(missing):
        on_device = missing.to(weight.device)
        fitted, _ = fit_cheap_kernels(
            weight.index_select(0, intrinsic[source[missing].to(weight.device)]),
            weight.index_select(0, ghosts[on_device]),
            draft.stride,
            draft.dilation,
            draft.dw_size,
            costs.target_sq[missing].to(weight.device),
        )
        kernels[missing] = fitted.to(kernels.device, kernels.dtype)
    return GhostLayout(intrinsic, ghosts, slot.to(weight.device), kernels)
