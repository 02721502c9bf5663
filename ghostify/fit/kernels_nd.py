"""The data-free cheap-kernel fit along any number of spatial dimensions (Conv1d/2d/3d filters).

The same least squares as ``kernels.fit_cheap_kernels`` (which is the 2-D case and hands other
filter shapes here): a depthwise kernel ``d`` on the primary's output grid, applied after a kept
filter, acts on the input as ``d (*) source`` with taps ``stride`` apart; ``d`` is fitted so that
this best matches the ghost's own filter. The normal equations need only the overlaps of shifted
copies of the filters, which batched matrix products give for every pair at once.
"""

from __future__ import annotations

import itertools
import math

import torch

_EPS = 1e-12
# Position-pair products computed at once in ``correlations`` (16M floats: 64 MB in float32).
_PAIR_CHUNK = 1 << 24


def correlations(fixed: torch.Tensor, moving: torch.Tensor, reach: tuple[int, ...]) -> torch.Tensor:
    """``out[n, *p] = sum fixed[n, c, *i] * moving[n, c, *(i + p')]`` for shifts ``|p'| <= reach``.

    Shift ``p'`` sits at index ``p' + reach``; ``fixed`` and ``moving`` are ``(n, C, *kernel)``.
    The channel sums of every pair of kernel positions are one batched matrix product, each
    added to the shift between its two positions: on a CPU that is 10-35x faster than the
    grouped convolution doing the same sums (tiny spatial sizes, thousands of groups).
    """
    n, channels, *kernel = fixed.shape
    positions = math.prod(kernel)
    grid = torch.meshgrid(*[torch.arange(k) for k in kernel], indexing="ij")
    position = torch.stack(grid, dim=-1).view(positions, len(kernel))
    shift = position[None, :, :] - position[:, None, :]  # [i, j]: j - i
    reach_t = torch.tensor(reach)
    inside = (shift.abs() <= reach_t).all(dim=-1).flatten()
    size = 2 * reach_t + 1
    flat = torch.zeros(positions, positions, dtype=torch.long)
    for axis in range(len(kernel)):
        flat = flat * size[axis] + shift[..., axis] + reach_t[axis]
    flat = flat.flatten()[inside].to(fixed.device)
    inside = inside.to(fixed.device)
    out = fixed.new_zeros(n, int(size.prod()))
    rows = fixed.reshape(n, channels, positions).transpose(1, 2)
    cols = moving.reshape(n, channels, positions)
    step = max(1, _PAIR_CHUNK // positions**2)  # bounds the (chunk, K, K) products held at once
    for start in range(0, n, step):
        pairs = torch.bmm(rows[start : start + step], cols[start : start + step])
        out[start : start + step].index_add_(1, flat, pairs.flatten(1)[:, inside])
    return out.view(n, *size.tolist())


def _lookup(
    table: torch.Tensor,
    offsets: torch.Tensor,
    dilation: torch.Tensor,
    reach: torch.Tensor,
) -> torch.Tensor:
    """``table[:, offset / dilation + reach]`` for each offset (in input pixels), 0 off-lattice.

    Shifted copies of a dilated filter only meet where the offset is a multiple of the dilation,
    and not at all beyond ``reach``. ``offsets`` is ``(..., dims)``; returns ``(n, ...)``.
    """
    on_lattice = (offsets % dilation == 0).all(dim=-1)
    shift = torch.div(offsets, dilation, rounding_mode="floor")
    inside = on_lattice & (shift.abs() <= reach).all(dim=-1)
    index = (shift + reach).clamp_min(0)
    size = 2 * reach + 1
    flat = torch.zeros(offsets.shape[:-1], dtype=torch.long)
    for axis in range(offsets.shape[-1]):
        flat = flat * size[axis] + index[..., axis].clamp_max(size[axis] - 1)
    values = table.flatten(1)[:, flat.flatten().to(table.device)].view(-1, *flat.shape)
    return values * inside.to(values)


def _distinct_rows(filters: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct filters of ``filters`` and, for each filter, its row among them.

    Rows are told apart by a fixed random projection (far cheaper than sorting whole rows),
    then checked to be equal to their representative; if any is not, every row is kept.
    """
    flat = filters.flatten(1)
    generator = torch.Generator().manual_seed(0)
    direction = torch.randn(flat.shape[1], 1, generator=generator, dtype=flat.dtype)
    key = (flat @ direction.to(flat.device)).flatten()
    _, first, which = _first_of_each(key)
    distinct = filters[first]
    if not torch.equal(distinct[which], filters):
        return filters, torch.arange(len(filters), device=filters.device)
    return distinct, which


def _first_of_each(key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unique values of ``key``, the index of one occurrence of each, and the inverse map."""
    values, which = torch.unique(key, return_inverse=True)
    first = torch.empty(len(values), dtype=torch.long, device=key.device)
    first[which] = torch.arange(len(key), device=key.device)
    return values, first, which


def fit_cheap_kernels_nd(
    source: torch.Tensor,
    target: torch.Tensor,
    stride: tuple[int, ...],
    dilation: tuple[int, ...],
    dw_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares depthwise kernels so that ``kernel (*) source[n]`` best matches ``target[n]``.

    ``source`` and ``target`` are ``(n, C, *kernel)`` filters; returns the kernels
    ``(n, *[dw_size] * dims)`` and each fit's squared residual ``(n,)``.
    """
    n, _, *kernel = source.shape
    dims = len(kernel)
    dtype = source.dtype if source.dtype in (torch.float32, torch.float64) else torch.float32
    src, tgt = source.to(dtype), target.to(dtype)
    # Kernel taps are at most (dw_size - 1) * stride apart in input pixels, dilation-spaced.
    reach = tuple(
        min(k - 1, (dw_size - 1) * s // d) for k, s, d in zip(kernel, stride, dilation, strict=True)
    )
    # The normal matrix depends on the source alone, and callers repeat each kept filter for
    # several candidate ghosts: correlate each distinct source once. The right-hand side only
    # needs the shifts of one kernel radius.
    sources, which = _distinct_rows(src)
    auto = correlations(sources, sources, reach).double()[which]
    near = tuple(
        min(r, dw_size // 2 * s // d) for r, s, d in zip(reach, stride, dilation, strict=True)
    )
    cross = correlations(src, tgt, near).double()
    taps = torch.tensor(list(itertools.product(range(dw_size), repeat=dims))).view(-1, dims)
    steps = torch.tensor(stride)
    dilation_t, reach_t = torch.tensor(dilation), torch.tensor(reach)
    rhs = _lookup(cross, (taps - dw_size // 2) * steps, dilation_t, torch.tensor(near))
    normal = _lookup(auto, (taps[:, None] - taps[None, :]) * steps, dilation_t, reach_t)
    size = taps.shape[0]
    # A small ridge keeps the solve well posed for near-zero filters.
    scale = normal.diagonal(dim1=1, dim2=2).mean(dim=1).clamp_min(_EPS)
    eye = torch.eye(size, dtype=normal.dtype, device=normal.device)
    kernels = torch.linalg.solve(normal + (1e-8 * scale)[:, None, None] * eye, rhs.unsqueeze(-1))
    kernels = kernels.squeeze(-1)
    # At the least-squares optimum, |T - A d|^2 = |T|^2 - rhs . d.
    targets, target_of = _distinct_rows(tgt)
    target_sq = targets.flatten(1).double().square().sum(dim=1)[target_of]
    residual = target_sq - (rhs * kernels).sum(dim=1)
    return kernels.reshape(n, *[dw_size] * dims), residual
