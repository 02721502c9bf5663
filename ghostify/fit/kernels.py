"""Least-squares depthwise kernels: how well one filter is a cheap transform of another.

Both steps of a ghost channel are linear, so a depthwise kernel ``d`` applied after the primary
filter ``W_s`` is one convolution with an effective kernel ``d (*) W_s`` on the input; ``d`` is the
least-squares fit of that effective kernel to the original filter ``W_g``. The normal equations
need only the overlaps of shifted copies of the filters, which batched matrix products give for
thousands of filter pairs at once.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

_EPS = 1e-12
# Elements of the per-pair tap-overlap tables computed at once (bounds the memory to ~64 MB).
_CHUNK_ELEMENTS = 1 << 24
# Elements of source filters gathered at once for the candidate pairs (1 MB in float32).
_GATHER_ELEMENTS = 1 << 18


def as_float(tensor: torch.Tensor) -> torch.Tensor:
    """Float32 or float64 as given; half precision is too coarse for the normal equations."""
    return tensor if tensor.dtype in (torch.float32, torch.float64) else tensor.float()


def reach_of(
    kernel: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int], dw_size: int
) -> tuple[int, int]:
    """Largest filter shift (in filter taps) between two cheap-kernel taps that still overlaps."""
    return tuple(
        min(k - 1, (dw_size - 1) * s // d) for k, s, d in zip(kernel, stride, dilation, strict=True)
    )


@lru_cache(maxsize=64)
def _shift_table(kernel: tuple[int, int], reach: tuple[int, int]) -> torch.Tensor:
    """Which shift each pair of filter taps contributes to, as a (taps^2, shifts) 0/1 matrix.

    Shift ``(p, q)`` with ``|p| <= reach[0]``, ``|q| <= reach[1]`` is column
    ``(p + reach[0]) * (2 * reach[1] + 1) + q + reach[1]``: tap ``(i, j)`` of the fixed filter
    meets tap ``(i + p, j + q)`` of the moving one.
    """
    kh, kw = kernel
    width = 2 * reach[1] + 1
    table = torch.zeros(kh, kw, kh, kw, (2 * reach[0] + 1) * width)
    for p in range(-reach[0], reach[0] + 1):
        for q in range(-reach[1], reach[1] + 1):
            column = (p + reach[0]) * width + q + reach[1]
            for i in range(max(0, -p), min(kh, kh - p)):
                for j in range(max(0, -q), min(kw, kw - q)):
                    table[i, j, i + p, j + q, column] = 1.0
    return table.reshape(kh * kw * kh * kw, -1)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise inner products of two ``(n, ...)`` tensors, without an elementwise temporary
    (4x faster than a batched product of 1-row matrices)."""
    return torch.linalg.vecdot(a.reshape(len(a), -1), b.reshape(len(b), -1))


def _by_slices(fixed: torch.Tensor, moving: torch.Tensor, reach: tuple[int, int]) -> torch.Tensor:
    """Shift correlations as one inner product of overlapping slices per shift."""
    _, _, kh, kw = fixed.shape
    return torch.stack(
        [
            _dot(
                fixed[:, :, max(0, -p) : kh - max(0, p), max(0, -q) : kw - max(0, q)],
                moving[:, :, max(0, p) : kh + min(0, p), max(0, q) : kw + min(0, q)],
            )
            for p in range(-reach[0], reach[0] + 1)
            for q in range(-reach[1], reach[1] + 1)
        ],
        dim=1,
    )


def _few_taps(kernel: tuple[int, int], reach: tuple[int, int]) -> bool:
    """Whether summing every tap pair (taps^2 products) beats one slice product per shift."""
    return kernel[0] * kernel[1] <= 4 * (2 * reach[0] + 1) * (2 * reach[1] + 1)


def correlations(fixed: torch.Tensor, moving: torch.Tensor, reach: tuple[int, int]) -> torch.Tensor:
    """``out[n, s] = sum_{c,i,j} fixed[n,c,i,j] * moving[n,c,i+p,j+q]`` for every small shift.

    ``s`` indexes the shifts ``(p, q)`` with ``|p| <= reach[0]``, ``|q| <= reach[1]`` row by row
    (see ``_shift_table``). Small kernels: one batched product of the filters' tap matrices sums
    over channels for every pair of taps, and a fixed 0/1 matrix adds up the pairs of each shift.
    Large kernels (few shifts, many taps): one inner product of overlapping slices per shift.
    """
    n, channels, kh, kw = fixed.shape
    if kh * kw == 1:  # pointwise filters: one shift, a row-wise inner product
        return _dot(fixed, moving).unsqueeze(1)
    if not _few_taps((kh, kw), reach):
        return _by_slices(fixed, moving, reach)
    taps = kh * kw
    table = _shift_table((kh, kw), reach).to(fixed.device, fixed.dtype)
    out = fixed.new_empty(n, table.shape[1])
    step = max(1, _CHUNK_ELEMENTS // (taps * max(taps, channels)))
    for start in range(0, n, step):
        a = fixed[start : start + step].reshape(-1, channels, taps)
        b = moving[start : start + step].reshape(-1, channels, taps)
        overlaps = torch.bmm(a.transpose(1, 2), b)  # (pairs, taps, taps)
        out[start : start + step] = overlaps.reshape(len(a), taps * taps) @ table
    return out


def option_correlations(
    sources: torch.Tensor, targets: torch.Tensor, options: torch.Tensor, reach: tuple[int, int]
) -> torch.Tensor:
    """``correlations(sources[options[g, j]], targets[g])`` for every ghost ``g`` and option ``j``,
    as ``(ghosts * options, shifts)``, without copying each target once per option."""
    n, count = options.shape
    m, channels, kh, kw = sources.shape
    if not _few_taps((kh, kw), reach):
        return _by_slices(sources[options.flatten()], targets.repeat_interleave(count, 0), reach)
    taps = kh * kw
    table = _shift_table((kh, kw), reach).to(sources.device, sources.dtype)
    # The sources channels last, so that each ghost's candidates gathered make one matrix.
    by_tap = sources.reshape(m, channels, taps).transpose(1, 2).contiguous()  # (m, taps, C)
    moving = targets.reshape(n, channels, taps)  # (n, C, taps)
    on_cpu = sources.device.type == "cpu"
    out = sources.new_empty(n, count, table.shape[1])
    # Small chunks: the gathered sources stay in cache (and under the allocator's mmap size).
    step = max(1, _GATHER_ELEMENTS // (count * taps * channels))
    for start in range(0, n, step):
        chunk = options[start : start + step].flatten()
        picked = by_tap.index_select(0, chunk).view(-1, count * taps, channels)
        # (candidate, source tap) rows against target-tap columns: one small product per
        # ghost, which numpy's BLAS runs 15-20% faster than torch's on the CPU.
        target = moving[start : start + step]
        if on_cpu:
            overlaps = torch.from_numpy(np.matmul(picked.numpy(), target.numpy()))
        else:
            overlaps = torch.bmm(picked, target)
        out[start : start + step] = overlaps.view(-1, count, taps * taps) @ table
    return out.reshape(n * count, -1)


@lru_cache(maxsize=64)
def _normal_indices(
    dw_size: int,
    stride: tuple[int, int],
    dilation: tuple[int, int],
    reach: tuple[int, int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Columns of the shift table holding each normal-matrix entry and each right-hand side.

    Tap ``a`` of the cheap kernel places a copy of the source filter ``a * stride`` input pixels
    from the centre; two copies meet only where the offset lands on the filter's dilated
    lattice and within ``reach``. Index ``shifts`` (one past the last) means "no overlap": 0.
    """
    width = 2 * reach[1] + 1
    shifts = (2 * reach[0] + 1) * width
    radius = dw_size // 2

    def column(offset_h: int, offset_w: int) -> int:
        if offset_h % dilation[0] or offset_w % dilation[1]:
            return shifts
        p, q = offset_h // dilation[0], offset_w // dilation[1]
        if abs(p) > reach[0] or abs(q) > reach[1]:
            return shifts
        return (p + reach[0]) * width + q + reach[1]

    taps = [(u, v) for u in range(dw_size) for v in range(dw_size)]
    normal = [
        [column((ui - uj) * stride[0], (vi - vj) * stride[1]) for (uj, vj) in taps]
        for (ui, vi) in taps
    ]
    rhs = [column((u - radius) * stride[0], (v - radius) * stride[1]) for (u, v) in taps]
    return torch.tensor(normal), torch.tensor(rhs)


def solve_kernels(
    auto: torch.Tensor,
    cross: torch.Tensor,
    target_sq: torch.Tensor,
    stride: tuple[int, int],
    dilation: tuple[int, int],
    dw_size: int,
    reach: tuple[int, int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernels ``(n, dw, dw)`` and squared residuals ``(n,)`` from the shift correlations.

    ``auto[n]`` are the source filter's correlations with itself, ``cross[n]`` with the target,
    ``target_sq[n]`` the target's squared norm.
    """
    n = auto.shape[0]
    if reach == (0, 0):  # no shifted copies overlap: a diagonal system, only the centre tap fits
        auto, cross = auto[:, 0].double(), cross[:, 0].double()
        centre = cross / (auto + 1e-8 * auto.clamp_min(_EPS))
        kernels = auto.new_zeros(n, dw_size * dw_size)
        kernels[:, dw_size * dw_size // 2] = centre
        residual = target_sq.double() - cross * centre
        return kernels.reshape(n, dw_size, dw_size), residual
    normal_index, rhs_index = _normal_indices(dw_size, stride, dilation, reach)
    zero = auto.new_zeros(n, 1)
    normal = torch.cat([auto, zero], dim=1)[:, normal_index.to(auto.device)].double()
    rhs = torch.cat([cross, zero], dim=1)[:, rhs_index.to(auto.device)].double()
    size = dw_size * dw_size
    # A small ridge keeps the solve well posed for near-zero filters.
    scale = normal.diagonal(dim1=1, dim2=2).mean(dim=1).clamp_min(_EPS)
    eye = torch.eye(size, dtype=normal.dtype, device=normal.device)
    kernels = torch.linalg.solve(normal + (1e-8 * scale)[:, None, None] * eye, rhs.unsqueeze(-1))
    kernels = kernels.squeeze(-1)
    # At the least-squares optimum, |T - A d|^2 = |T|^2 - rhs . d.
    residual = target_sq.double() - (rhs * kernels).sum(dim=1)
    return kernels.reshape(n, dw_size, dw_size), residual


def fit_cheap_kernels(
    source: torch.Tensor,
    target: torch.Tensor,
    stride: tuple[int, int],
    dilation: tuple[int, int],
    dw_size: int,
    target_sq: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares depthwise kernels so that ``kernel (*) source[n]`` best matches ``target[n]``.

    ``source`` and ``target`` are ``(n, C, kh, kw)`` filters of the primary convolution. The
    depthwise kernel runs on the primary's output grid, so in input coordinates its taps are
    ``stride`` apart while the filter taps are ``dilation`` apart. Returns the kernels
    ``(n, dw_size, dw_size)`` and each fit's squared residual ``(n,)``. ``target_sq``, the
    targets' squared norms, saves a float64 pass over them when the caller has them.
    """
    if source.dim() != 4:  # Conv1d / Conv3d filters: the same fit along their dimensions
        from .kernels_nd import fit_cheap_kernels_nd

        return fit_cheap_kernels_nd(source, target, stride, dilation, dw_size)
    src = as_float(source)
    tgt = target.to(src.dtype)
    reach = reach_of(tuple(src.shape[2:]), stride, dilation, dw_size)
    auto = correlations(src, src, reach)
    cross = correlations(src, tgt, reach)
    if target_sq is None:
        target_sq = tgt.double().flatten(1).square().sum(dim=1)
    return solve_kernels(auto, cross, target_sq, stride, dilation, dw_size, reach)
