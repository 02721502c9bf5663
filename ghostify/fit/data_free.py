"""Data-free fitting of a GhostModule to a trained convolution's filters.

The primary convolution keeps a subset of the original filters unchanged ("intrinsic" channels), so
those output channels are reproduced exactly. Every other filter becomes a "ghost" channel: a
depthwise kernel ``d`` applied to one intrinsic channel's output. Because both steps are linear,
``d`` applied after the primary filter ``W_s`` is one convolution with an effective kernel
``d (*) W_s`` on the input; ``d`` is the least-squares fit of that effective kernel to the
original filter ``W_g``. No data is needed, only the weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from .kernels_nd import fit_cheap_kernels_nd

_EPS = 1e-12
# Multiply-adds allowed for trying alternative ghost sources in one layer (about a second).
_WORK_BUDGET = 4 * 10**9
# Filters longer than this are compared through a random projection of this size.
_SKETCH_DIM = 512
# Layers with more ghosts than this are assigned greedily (the exact method is cubic).
_EXACT_ASSIGNMENT = 4096


def _working_copy(weight: torch.Tensor) -> torch.Tensor:
    """The filters as ``(out, d)`` float rows for similarity search (half precision is too coarse).

    Very long filters (a 512-channel 7x7 filter has 25,088 weights) are projected onto
    ``_SKETCH_DIM`` fixed random directions first: inner products, and so norms and cosines, are
    kept up to a few percent (Johnson-Lindenstrauss), and the Gram matrices get ~50x cheaper. The
    projection is seeded, so conversions stay deterministic; the final least-squares fit always
    uses the exact filters.
    """
    flat = weight.reshape(weight.shape[0], -1)
    flat = flat if flat.dtype in (torch.float32, torch.float64) else flat.float()
    if flat.shape[1] <= _SKETCH_DIM:
        return flat
    generator = torch.Generator().manual_seed(0)
    sketch = torch.randn(flat.shape[1], _SKETCH_DIM, generator=generator, dtype=flat.dtype)
    return flat @ sketch.to(flat.device) / _SKETCH_DIM**0.5


def select_intrinsic(weight: torch.Tensor, groups: int, per_group: int) -> torch.Tensor:
    """Choose ``per_group`` filters in each group to keep exactly; returns original indices.

    Greedy farthest-point selection: take the filter the current set explains worst, where a set
    explains a filter by its best scaled copy (residual ``|w|^2 (1 - max cos^2)``). This is cheap
    (one Gram matrix per group) and spreads the kept filters over the directions that matter.
    """
    out_channels = weight.shape[0]
    per_group_out = out_channels // groups
    flat = _working_copy(weight)
    chosen: list[torch.Tensor] = []
    for group in range(groups):
        start = group * per_group_out
        rows = flat[start : start + per_group_out]
        norms_sq = (rows * rows).sum(dim=1)
        gram = rows @ rows.T
        cos_sq = gram.square() / (norms_sq[:, None] * norms_sq[None, :]).clamp_min(_EPS)
        # The loop runs once per kept filter: numpy makes each small step ~100x cheaper.
        # explained[s, g]: what is left of filter g once filter s is kept (rows are contiguous).
        explained = ((1.0 - cos_sq) * norms_sq[None, :]).double().cpu().numpy()
        residual = norms_sq.double().cpu().numpy().copy()
        picked = np.zeros(per_group, dtype=np.int64)
        for step in range(per_group):
            best = int(residual.argmax())
            picked[step] = best
            np.minimum(residual, explained[best], out=residual)
            residual[best] = -1.0  # never pick a filter twice
        chosen.append(torch.from_numpy(np.sort(picked)) + start)
    return torch.cat(chosen)


def candidate_sources(
    weight: torch.Tensor, intrinsic: torch.Tensor, ghosts: torch.Tensor, groups: int, count: int
) -> torch.Tensor:
    """For each ghost filter, positions (in ``intrinsic``) of its ``count`` most similar kept ones.

    Similarity is |cosine| of the flattened filters; only kept filters of the same group qualify,
    since a filter of another group sees other input channels. Returns ``(ghosts, count)``.
    """
    similarity = _similarity(weight, intrinsic, ghosts, groups)
    count = min(count, len(intrinsic) // groups)  # never reach into another group
    return similarity.topk(count, dim=1).indices


def _similarity(
    weight: torch.Tensor, intrinsic: torch.Tensor, ghosts: torch.Tensor, groups: int
) -> torch.Tensor:
    """|cosine| between each ghost filter and each kept filter; -1 across groups."""
    per_group_out = weight.shape[0] // groups
    flat = _working_copy(weight)
    unit = flat / flat.norm(dim=1, keepdim=True).clamp_min(_EPS)
    similarity = (unit[ghosts] @ unit[intrinsic].T).abs()
    same_group = (ghosts[:, None] // per_group_out) == (intrinsic[None, :] // per_group_out)
    return torch.where(same_group, similarity, torch.full_like(similarity, -1.0))


@dataclass
class PairCosts:
    """Fit residual of every (ghost filter, kept filter) pair, exact where it was fitted.

    ``cost[g, s]`` is the squared residual of the best depthwise fit of ghost ``g`` from kept
    filter ``s``: exact for each ghost's most similar candidates, and elsewhere the residual of
    the centre-tap fit (a scaled copy), which bounds the exact one from above. Pairs across
    groups cost more than any pair inside one. ``kernels`` holds the exact fits found so far.
    """

    cost: torch.Tensor  # (ghosts, intrinsic), float64, on the CPU
    kernels: dict[tuple[int, int], torch.Tensor]


def pair_costs(
    weight: torch.Tensor,
    intrinsic: torch.Tensor,
    ghosts: torch.Tensor,
    groups: int,
    stride: tuple[int, int],
    dilation: tuple[int, int],
    dw_size: int,
    candidates: int = 8,
) -> PairCosts:
    """Residuals of fitting every ghost filter from every kept filter (see ``PairCosts``)."""
    similarity = _similarity(weight, intrinsic, ghosts, groups).double().cpu()
    flat = weight.reshape(weight.shape[0], -1)
    target_sq = flat[ghosts].double().square().sum(dim=1).cpu()
    cost = target_sq[:, None] * (1.0 - similarity.clamp_min(0.0).square())
    across = cost.max() * 4 + target_sq[:, None] + 1.0
    cost = torch.where(similarity < 0, across, cost)
    # Each candidate costs one filter-sized correlation per shift: keep big layers affordable.
    work = len(ghosts) * weight[0].numel() * (2 * dw_size - 1) ** 2
    candidates = max(1, min(candidates, _WORK_BUDGET // max(1, work)))
    options = candidate_sources(weight, intrinsic, ghosts, groups, candidates).cpu()
    n, count = options.shape
    sources = weight[intrinsic][options.flatten().to(weight.device)]
    targets = weight[ghosts].repeat_interleave(count, dim=0)
    fitted, residual = fit_cheap_kernels(sources, targets, stride, dilation, dw_size)
    rows = torch.arange(n).repeat_interleave(count)
    cols = options.flatten()
    cost[rows, cols] = residual.cpu().clamp_min(0.0)
    kernels = dict(zip(zip(rows.tolist(), cols.tolist(), strict=True), fitted, strict=True))
    return PairCosts(cost, kernels)


def assign_balanced(cost: torch.Tensor, slot_source: torch.Tensor) -> torch.Tensor:
    """The slot each ghost takes, minimising the total cost, with one ghost per slot.

    Slot ``j`` reads kept filter ``slot_source[j]``, so each kept filter feeds as many ghosts as
    it has slots (the balanced layout a gather-free GhostModule computes). An optimal assignment
    (the Hungarian method, scipy's ``linear_sum_assignment``) up to ``_EXACT_ASSIGNMENT`` ghosts;
    beyond that a greedy one, cheapest pairs first.
    """
    matrix = cost[:, slot_source].numpy()
    n = matrix.shape[0]
    slot = np.full(n, -1, dtype=np.int64)
    if n <= _EXACT_ASSIGNMENT:
        rows, cols = linear_sum_assignment(matrix)
        slot[rows] = cols
        return torch.from_numpy(slot)
    taken = np.zeros(n, dtype=bool)
    for flat in np.argsort(matrix, axis=None, kind="stable"):
        g, j = divmod(int(flat), n)
        if slot[g] < 0 and not taken[j]:
            slot[g], taken[j] = j, True
    return torch.from_numpy(slot)


@dataclass
class GhostLayout:
    """A data-free fit: which filters are kept, where each ghost goes, and its kernel."""

    intrinsic: torch.Tensor  # original channel of each primary output, (m,)
    ghosts: torch.Tensor  # original channel of each ghost, (n,)
    slot: torch.Tensor  # cheap-conv slot of each ghost, (n,)
    kernels: torch.Tensor  # depthwise kernel of each ghost, (n, dw, dw)


def fit_layout(
    weight: torch.Tensor,
    groups: int,
    intrinsic_channels: int,
    slot_source: torch.Tensor,
    stride: tuple[int, int],
    dilation: tuple[int, int],
    dw_size: int,
) -> GhostLayout:
    """Choose the kept filters, assign every other filter to a slot, fit its kernel."""
    intrinsic = select_intrinsic(weight, groups, intrinsic_channels // groups).to(weight.device)
    is_ghost = torch.ones(weight.shape[0], dtype=torch.bool, device=weight.device)
    is_ghost[intrinsic] = False
    ghosts = torch.nonzero(is_ghost).flatten()
    costs = pair_costs(weight, intrinsic, ghosts, groups, stride, dilation, dw_size)
    slot = assign_balanced(costs.cost, slot_source)
    source = slot_source[slot].tolist()
    missing = [g for g, s in enumerate(source) if (g, s) not in costs.kernels]
    if missing:  # the assignment chose pairs outside each ghost's candidates: fit them now
        index = torch.tensor(missing, device=weight.device)
        chosen = torch.tensor([source[g] for g in missing], device=weight.device)
        fitted, _ = fit_cheap_kernels(
            weight[intrinsic][chosen], weight[ghosts][index], stride, dilation, dw_size
        )
        costs.kernels.update(
            {(g, source[g]): kernel for g, kernel in zip(missing, fitted, strict=True)}
        )
    kernels = torch.stack([costs.kernels[(g, s)] for g, s in enumerate(source)])
    return GhostLayout(intrinsic, ghosts, slot.to(weight.device), kernels)


def _correlations(
    fixed: torch.Tensor, moving: torch.Tensor, reach: tuple[int, int]
) -> torch.Tensor:
    """``out[n, p, q] = sum_{c,i,j} fixed[n,c,i,j] * moving[n,c,i+p',j+q']`` for small shifts.

    Shift ``(p', q')`` with ``|p'| <= reach[0]``, ``|q'| <= reach[1]`` sits at index
    ``(p' + reach[0], q' + reach[1])``. One grouped convolution computes them for every filter
    pair at once; only the shifts the normal equations use are computed (a 7x7 filter has 169
    shifts, a 3x3 depthwise fit needs 25).
    """
    n, channels, kh, kw = fixed.shape
    stacked = moving.reshape(1, n * channels, kh, kw)
    return F.conv2d(stacked, fixed, padding=reach, groups=n)[0]


def fit_cheap_kernels(
    source: torch.Tensor,
    target: torch.Tensor,
    stride: tuple[int, int],
    dilation: tuple[int, int],
    dw_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares depthwise kernels so that ``kernel (*) source[n]`` best matches ``target[n]``.

    ``source`` and ``target`` are ``(n, C, kh, kw)`` filters of the primary convolution. The
    depthwise kernel runs on the primary's output grid, so in input coordinates its taps are
    ``stride`` apart while the filter taps are ``dilation`` apart. Tap ``a`` of the kernel places
    a copy of the source filter at offset ``a * stride``; the normal equations need only the
    overlaps of those shifted copies with each other and with the target (placed at the centre).
    Returns the kernels ``(n, dw_size, dw_size)`` and each fit's squared residual ``(n,)``.
    """
    if source.dim() != 4:  # Conv1d / Conv3d filters: the same fit along their dimensions
        return fit_cheap_kernels_nd(source, target, stride, dilation, dw_size)
    n, _, kh, kw = source.shape
    dtype = source.dtype if source.dtype in (torch.float32, torch.float64) else torch.float32
    src, tgt = source.to(dtype), target.to(dtype)
    # Kernel taps are at most (dw_size - 1) * stride apart in input pixels, dilation-spaced.
    reach = tuple(
        min(k - 1, (dw_size - 1) * s // d)
        for k, s, d in zip((kh, kw), stride, dilation, strict=True)
    )
    auto = _correlations(src, src, reach).double()
    cross = _correlations(src, tgt, reach).double()
    radius = dw_size // 2
    taps = [(u, v) for u in range(dw_size) for v in range(dw_size)]

    def at(table: torch.Tensor, offset_h: int, offset_w: int) -> torch.Tensor:
        # Shifted copies only meet where the offset lands on the filter's dilated lattice.
        if offset_h % dilation[0] or offset_w % dilation[1]:
            return table.new_zeros(n)
        p, q = offset_h // dilation[0], offset_w // dilation[1]
        if abs(p) > reach[0] or abs(q) > reach[1]:
            return table.new_zeros(n)  # the shifted copies do not overlap
        return table[:, p + reach[0], q + reach[1]]

    size = len(taps)
    normal = auto.new_zeros(n, size, size)
    rhs = auto.new_zeros(n, size)
    for i, (u_i, v_i) in enumerate(taps):
        rhs[:, i] = at(cross, (u_i - radius) * stride[0], (v_i - radius) * stride[1])
        for j, (u_j, v_j) in enumerate(taps):
            normal[:, i, j] = at(auto, (u_i - u_j) * stride[0], (v_i - v_j) * stride[1])
    # A small ridge keeps the solve well posed for near-zero filters.
    scale = normal.diagonal(dim1=1, dim2=2).mean(dim=1).clamp_min(_EPS)
    eye = torch.eye(size, dtype=normal.dtype, device=normal.device)
    kernels = torch.linalg.solve(normal + (1e-8 * scale)[:, None, None] * eye, rhs.unsqueeze(-1))
    kernels = kernels.squeeze(-1)
    # At the least-squares optimum, |T - A d|^2 = |T|^2 - rhs . d.
    target_sq = tgt.double().flatten(1).square().sum(dim=1)
    residual = target_sq - (rhs * kernels).sum(dim=1)
    return kernels.reshape(n, dw_size, dw_size), residual
