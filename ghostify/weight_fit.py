"""Data-free fitting of a GhostModule to a trained convolution's filters.

The primary convolution keeps a subset of the original filters unchanged ("intrinsic" channels), so
those output channels are reproduced exactly. Every other filter becomes a "ghost" channel: a
depthwise kernel ``d`` applied to one intrinsic channel's output. Because both steps are linear,
``d`` applied after the primary filter ``W_s`` is one convolution with an effective kernel
``d (*) W_s`` on the input; ``d`` is the least-squares fit of that effective kernel to the
original filter ``W_g``. No data is needed, only the weights.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

_EPS = 1e-12


def _working_copy(weight: torch.Tensor) -> torch.Tensor:
    """Float32 (or float64) view of the filters, ``(out, -1)``; half precision is too coarse."""
    flat = weight.reshape(weight.shape[0], -1)
    return flat if flat.dtype in (torch.float32, torch.float64) else flat.float()


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
    out_channels = weight.shape[0]
    per_group_out = out_channels // groups
    flat = _working_copy(weight)
    unit = flat / flat.norm(dim=1, keepdim=True).clamp_min(_EPS)
    similarity = (unit[ghosts] @ unit[intrinsic].T).abs()
    same_group = (ghosts[:, None] // per_group_out) == (intrinsic[None, :] // per_group_out)
    similarity = torch.where(same_group, similarity, torch.full_like(similarity, -1.0))
    count = min(count, len(intrinsic) // groups)  # never reach into another group
    return similarity.topk(count, dim=1).indices


def fit_ghosts(
    weight: torch.Tensor,
    intrinsic: torch.Tensor,
    ghosts: torch.Tensor,
    groups: int,
    stride: tuple[int, int],
    dilation: tuple[int, int],
    dw_size: int,
    candidates: int = 8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Source position and depthwise kernel for every ghost filter.

    The most similar kept filters are only candidates: each is fitted, and the one whose fitted
    effective kernel is closest to the ghost's original filter wins.
    """
    options = candidate_sources(weight, intrinsic, ghosts, groups, candidates)
    n, count = options.shape
    sources = weight[intrinsic][options.flatten()]
    targets = weight[ghosts].repeat_interleave(count, dim=0)
    kernels, residual = fit_cheap_kernels(sources, targets, stride, dilation, dw_size)
    best = residual.reshape(n, count).argmin(dim=1)
    rows = torch.arange(n, device=best.device)
    chosen = kernels.reshape(n, count, dw_size, dw_size)[rows, best]
    return options[rows, best], chosen


def _correlations(fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
    """``out[n, p, q] = sum_{c,i,j} fixed[n,c,i,j] * moving[n,c,i+p',j+q']`` for every shift.

    Shift ``(p', q')`` sits at index ``(p' + kh - 1, q' + kw - 1)``. One grouped convolution
    computes every shift for every filter pair at once.
    """
    n, channels, kh, kw = fixed.shape
    stacked = moving.reshape(1, n * channels, kh, kw)
    return F.conv2d(stacked, fixed, padding=(kh - 1, kw - 1), groups=n)[0]


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
    n, _, kh, kw = source.shape
    dtype = source.dtype if source.dtype in (torch.float32, torch.float64) else torch.float32
    src, tgt = source.to(dtype), target.to(dtype)
    auto = _correlations(src, src).double()
    cross = _correlations(src, tgt).double()
    radius = dw_size // 2
    taps = [(u, v) for u in range(dw_size) for v in range(dw_size)]

    def at(table: torch.Tensor, offset_h: int, offset_w: int) -> torch.Tensor:
        # Shifted copies only meet where the offset lands on the filter's dilated lattice.
        if offset_h % dilation[0] or offset_w % dilation[1]:
            return table.new_zeros(n)
        p, q = offset_h // dilation[0], offset_w // dilation[1]
        if abs(p) >= kh or abs(q) >= kw:
            return table.new_zeros(n)
        return table[:, p + kh - 1, q + kw - 1]

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
