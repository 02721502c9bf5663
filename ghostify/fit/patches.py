"""Patches of a convolution's input as matrix columns, at all or at a sample of output positions.

Every statistic the calibrated fit needs is a product of two such matrices (``X @ X.T``, one BLAS
call per block), so the patches are gathered straight into the layout that product wants: one row
per (channel, tap), one column per (sample, position), contiguous. One ``index_select`` with a
precomputed index does it, for 1, 2 or 3 spatial dimensions, any stride and dilation, and for a
subset of output positions (the same subset in every sample, so it does not depend on how the
data is batched or sharded across ranks).
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn


def pad_like(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x`` padded exactly as ``conv`` pads it (any mode, ``"same"`` included)."""
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str) or any(conv.padding):
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        return F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
    return x


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


def patch_index(
    size: tuple[int, ...],
    kernel: tuple[int, ...],
    dilation: tuple[int, ...],
    stride: tuple[int, ...],
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Flat indices into a padded map of ``size``: ``(taps, positions)``, taps in weight order.

    ``positions`` are flat output positions (all of them when None).
    """
    out = output_size(size, kernel, dilation, stride)
    count = math.prod(out)
    flat_out = torch.arange(count) if positions is None else positions.cpu()
    coords = []
    rest = flat_out
    for length in reversed(out):  # unravel, last dimension fastest
        coords.append(rest % length)
        rest = rest // length
    coords.reverse()
    rows = []
    for tap in itertools.product(*(range(k) for k in kernel)):
        flat = torch.zeros_like(flat_out)
        for axis, length in enumerate(size):
            flat = flat * length + coords[axis] * stride[axis] + tap[axis] * dilation[axis]
        rows.append(flat)
    return torch.stack(rows)


def gather_columns(padded: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``(C, taps, N, s)`` patches of a padded ``(N, C, *size)`` map at ``index`` (taps, s)."""
    n, channels = padded.shape[:2]
    area = math.prod(padded.shape[2:])
    by_channel = padded.reshape(n, channels, area).transpose(0, 1).reshape(channels, n * area)
    taps, count = index.shape
    offsets = torch.arange(n, device=padded.device) * area
    flat = (index.to(padded.device)[:, None, :] + offsets[None, :, None]).reshape(-1)
    return by_channel.index_select(1, flat).view(channels, taps, n, count)


def conv_columns(
    conv: nn.Module, x: torch.Tensor, positions: torch.Tensor | None = None
) -> torch.Tensor:
    """``conv``'s input patches as ``(in_channels, taps, N, s)`` columns (padding applied)."""
    padded = pad_like(conv, x)
    index = patch_index(
        tuple(padded.shape[2:]), conv.kernel_size, conv.dilation, conv.stride, positions
    )
    return gather_columns(padded, index)


def input_patches(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``conv``'s input patches ``(N, in_channels * taps, L)``, one column per output position.

    ``weight.flatten(1) @ patches`` per group is ``conv``'s output without bias.
    """
    columns = conv_columns(conv, x)  # (C, taps, N, L)
    channels, taps, n, length = columns.shape
    return columns.permute(2, 0, 1, 3).reshape(n, channels * taps, length)


def tap_columns(
    outputs: torch.Tensor, dw_size: int, positions: torch.Tensor | None = None
) -> torch.Tensor:
    """The cheap conv's view of ``outputs`` ``(N, C, *size)``: ``(C, dw_size**dims + 1, N * s)``,
    the taps of a 'same'-padded ``dw_size`` kernel at each (sampled) position, then a 1."""
    dims = outputs.dim() - 2
    radius = dw_size // 2
    padded = F.pad(outputs, (radius,) * (2 * dims))
    index = patch_index(
        tuple(padded.shape[2:]), (dw_size,) * dims, (1,) * dims, (1,) * dims, positions
    )
    columns = gather_columns(padded, index)  # (C, taps, N, s)
    channels, taps, n, count = columns.shape
    features = columns.new_empty(channels, taps + 1, n * count)
    features[:, :taps] = columns.view(channels, taps, n * count)
    features[:, taps] = 1.0
    return features


def position_columns(values: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
    """``(N, C, *size)`` values as ``(C, N * s)`` columns at the (sampled) flat positions."""
    flat = values.flatten(2)
    if positions is not None:
        flat = flat.index_select(2, positions.to(values.device))
    return flat.transpose(0, 1).reshape(values.shape[1], -1)


def sample_positions(length: int, count: int | None, seed: int) -> torch.Tensor | None:
    """``count`` of ``length`` flat positions, drawn once from ``seed`` and sorted (None: all).

    The same positions serve every sample, on every rank, however the data is batched.
    """
    if count is None or count >= length:
        return None
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(length, generator=generator)[:count].sort().values
