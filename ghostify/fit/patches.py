"""Patches of a convolution's input as matrix columns, at all or at a sample of output positions.

Every statistic the calibrated fit needs is a product of two such matrices (``X @ X.T``, one BLAS
call per block), so the patches are gathered straight into the layout that product wants: one row
per (channel, tap), one column per (sample, position). One ``index_select`` per batch with a
precomputed index does it, for 1, 2 or 3 spatial dimensions, any stride and dilation, and for a
subset of output positions (the same subset in every sample, so it does not depend on how the
data is batched or sharded across ranks). Zero padding is not materialised: taps that fall in it
read a clamped index and are masked to zero, so only the gathered values are ever copied.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def _zero_padded(conv: nn.Module) -> bool:
    return conv.padding_mode == "zeros"


def pad_like(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x`` padded exactly as ``conv`` pads it (any mode, ``"same"`` included)."""
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str) or any(conv.padding):
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        return F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
    return x


def _left_padding(conv: nn.Module) -> tuple[tuple[int, int], ...]:
    """(before, after) padding per spatial dimension, first dimension first."""
    pads = conv._reversed_padding_repeated_twice  # last dimension first, (left, right) pairs
    pairs = [(pads[2 * i], pads[2 * i + 1]) for i in range(len(pads) // 2)]
    return tuple(reversed(pairs))


def output_size(
    size: tuple[int, ...],
    kernel: tuple[int, ...],
    dilation: tuple[int, ...],
    stride: tuple[int, ...],
) -> list[int]:
    """Output grid of a convolution over an already padded input of spatial ``size``."""
    return [
        (length - d * (k - 1) - 1) // s + 1
        for length, k, d, s in zip(size, kernel, dilation, stride, strict=True)
    ]


@dataclass
class PatchIndex:
    """Where each (tap, position) of a patch reads an unpadded map: ``flat`` (taps, s) indices,
    ``inside`` (taps, s) False where the tap falls in the zero padding (None: nowhere)."""

    flat: torch.Tensor
    inside: torch.Tensor | None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.flat.shape)  # type: ignore[return-value]


def patch_index(
    size: tuple[int, ...],
    kernel: tuple[int, ...],
    dilation: tuple[int, ...],
    stride: tuple[int, ...],
    padding: tuple[tuple[int, int], ...] | None = None,
    positions: torch.Tensor | None = None,
) -> PatchIndex:
    """Indices into an unpadded map of ``size`` for each (tap, output position), taps in weight
    order; ``padding``: zeros (before, after) per dimension; ``positions``: flat output positions
    (all of them when None)."""
    padding = padding or tuple((0, 0) for _ in size)
    padded = tuple(n + a + b for n, (a, b) in zip(size, padding, strict=True))
    out = output_size(padded, kernel, dilation, stride)
    flat_out = torch.arange(math.prod(out)) if positions is None else positions.cpu()
    coords = []
    rest = flat_out
    for length in reversed(out):  # unravel, last dimension fastest
        coords.append(rest % length)
        rest = rest // length
    coords.reverse()
    rows, masks = [], []
    for tap in itertools.product(*(range(k) for k in kernel)):
        flat = torch.zeros_like(flat_out)
        inside = torch.ones_like(flat_out, dtype=torch.bool)
        for axis, length in enumerate(size):
            at = coords[axis] * stride[axis] + tap[axis] * dilation[axis] - padding[axis][0]
            inside &= (at >= 0) & (at < length)
            flat = flat * length + at.clamp(0, length - 1)
        rows.append(flat)
        masks.append(inside)
    inside = torch.stack(masks)
    return PatchIndex(torch.stack(rows), None if bool(inside.all()) else inside)


def _pick(flat: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``flat[:, :, index]`` of an ``(N, C, L)`` tensor (``torch.gather`` with an expanded index:
    ~4x ``index_select`` along the last dimension on a CPU)."""
    n, channels = flat.shape[:2]
    expanded = index.to(flat.device).view(1, 1, -1).expand(n, channels, -1)
    return torch.gather(flat, 2, expanded)


def gather(values: torch.Tensor, index: PatchIndex) -> torch.Tensor:
    """``(N, C, taps, s)`` patches of an unpadded ``(N, C, *size)`` map at ``index``."""
    n, channels = values.shape[:2]
    taps, count = index.shape
    picked = _pick(values.reshape(n, channels, -1), index.flat.reshape(-1))
    picked = picked.view(n, channels, taps, count)
    if index.inside is not None:
        picked.mul_(index.inside.to(values.device, values.dtype))
    return picked


def conv_index(
    conv: nn.Module, size: tuple[int, ...], positions: torch.Tensor | None = None
) -> tuple[PatchIndex, bool]:
    """``conv``'s patch index on an input of spatial ``size``, and whether the input must be
    padded first (padding modes other than zeros)."""
    if _zero_padded(conv):
        index = patch_index(
            size, conv.kernel_size, conv.dilation, conv.stride, _left_padding(conv), positions
        )
        return index, False
    padded = tuple(n + a + b for n, (a, b) in zip(size, _left_padding(conv), strict=True))
    return patch_index(padded, conv.kernel_size, conv.dilation, conv.stride, None, positions), True


def conv_patches(
    conv: nn.Module, x: torch.Tensor, positions: torch.Tensor | None = None
) -> torch.Tensor:
    """``conv``'s input patches ``(N, in_channels, taps, s)`` at (sampled) output positions."""
    index, pad_first = conv_index(conv, tuple(x.shape[2:]), positions)
    return gather(pad_like(conv, x) if pad_first else x, index)


def conv_at(conv: nn.Module, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` at flat output ``positions`` only: ``(N, out_channels, len(positions))``."""
    patches = conv_patches(conv, x, positions)  # (N, C_in, taps, u)
    n, count = patches.shape[0], patches.shape[3]
    groups = conv.groups
    by_group = patches.reshape(n, groups, -1, count)
    weight = conv.weight.reshape(groups, conv.out_channels // groups, -1).to(patches.dtype)
    out = torch.matmul(weight, by_group).reshape(n, conv.out_channels, count)
    if conv.bias is not None:
        out = out + conv.bias.to(out.dtype)[None, :, None]
    return out


def input_patches(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``conv``'s input patches ``(N, in_channels * taps, L)``, one column per output position.

    ``weight.flatten(1) @ patches`` per group is ``conv``'s output without bias.
    """
    patches = conv_patches(conv, x)
    n, channels, taps, length = patches.shape
    return patches.reshape(n, channels * taps, length)


def as_columns(patches: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``(N, C, taps, s)`` patches as ``(C, taps, N * s)`` columns of ``dtype``."""
    n, channels, taps, count = patches.shape
    columns = torch.empty(channels, taps, n, count, dtype=dtype, device=patches.device)
    columns.copy_(patches.permute(1, 2, 0, 3))
    return columns.view(channels, taps, n * count)


def tap_index(
    grid: tuple[int, ...], dw_size: int, positions: torch.Tensor | None = None
) -> PatchIndex:
    """The cheap conv's taps ('same' zero padding) at (sampled) positions of a ``grid`` map."""
    dims = len(grid)
    radius = dw_size // 2
    ones = (1,) * dims
    return patch_index(grid, (dw_size,) * dims, ones, ones, ((radius, radius),) * dims, positions)


def position_columns(values: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
    """``(N, C, *size)`` values as ``(C, N * s)`` float64 columns at the (sampled) positions."""
    flat = values.flatten(2)
    if positions is not None:
        flat = _pick(flat, positions)
    n, channels, count = flat.shape
    out = torch.empty(channels, n, count, dtype=torch.float64, device=flat.device)
    out.copy_(flat.transpose(0, 1))
    return out.view(flat.shape[1], -1)


class TapSampler:
    """Reads the cheap conv's taps of ``conv``'s output at (sampled) positions of its ``grid``.

    With a sample of the positions, ``conv`` need only be computed where some sampled tap reads
    it (``needed``): far less than the whole map when few positions are sampled.
    """

    def __init__(self, grid: tuple[int, ...], dw_size: int, positions: torch.Tensor | None) -> None:
        self.grid = grid
        self.index = tap_index(grid, dw_size, positions)  # into the whole map
        self.needed: torch.Tensor | None = None
        self.needed_index: PatchIndex | None = None  # into the values at ``needed``
        if positions is not None:
            needed, where = torch.unique(self.index.flat, return_inverse=True)
            if 2 * len(needed) < math.prod(grid):
                self.needed = needed
                self.needed_index = PatchIndex(where, self.index.inside)

    def outputs(self, conv: nn.Module, x: torch.Tensor, chunk_floats: int) -> torch.Tensor:
        """``conv(x)``: whole (one call), or at the needed positions (in chunks of samples)."""
        if self.needed is None:
            return conv(x)
        per_sample = conv.weight[0].numel() * conv.groups * len(self.needed)
        step = max(1, chunk_floats // max(1, per_sample))
        return torch.cat([conv_at(conv, part, self.needed) for part in x.split(step)])

    def columns(self, values: torch.Tensor) -> torch.Tensor:
        """``(C, taps, N * s)`` float64 columns of a whole map or of ``outputs(...)``."""
        whole = tuple(values.shape[2:]) == self.grid
        index = self.index if whole or self.needed_index is None else self.needed_index
        return as_columns(gather(values, index))


def conv_grid(conv: nn.Module, size: tuple[int, ...]) -> tuple[int, ...]:
    """``conv``'s output grid on an input of spatial ``size``."""
    padded = tuple(n + a + b for n, (a, b) in zip(size, _left_padding(conv), strict=True))
    return tuple(output_size(padded, conv.kernel_size, conv.dilation, conv.stride))


def sample_positions(length: int, count: int | None, seed: int) -> torch.Tensor | None:
    """``count`` of ``length`` flat positions, drawn once from ``seed`` and sorted (None: all).

    The same positions serve every sample, on every rank, however the data is batched.
    """
    if count is None or count >= length:
        return None
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(length, generator=generator)[:count].sort().values
