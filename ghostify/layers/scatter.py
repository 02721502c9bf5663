"""A GhostModule's channel order: permutations, and writing its halves straight into it."""

from __future__ import annotations

import numpy as np
import torch


def scatter_channels(
    intrinsic: torch.Tensor, ghosts: torch.Tensor, index: torch.Tensor
) -> torch.Tensor:
    """``cat([intrinsic, ghosts], 1)`` with channel ``i`` written to channel ``index[i]``.

    Writing each half straight to its place costs what the concatenation alone costs; a gather
    after the concatenation would copy everything a second time. The output keeps the inputs'
    memory layout (channels_last stays channels_last).
    """
    m = intrinsic.shape[1]
    out = _joined_buffer(intrinsic, ghosts)
    out.index_copy_(1, index[:m], intrinsic)
    out.index_copy_(1, index[m:], ghosts)
    return out


def write_halves(
    intrinsic: torch.Tensor, ghosts: torch.Tensor, intrinsic_bias: torch.Tensor | None
) -> torch.Tensor:
    """``cat([intrinsic + intrinsic_bias, ghosts], 1)`` written into one new buffer, the bias
    added on the way (one pass over the intrinsic half fewer); no autograd (out= writes)."""
    m, spatial = intrinsic.shape[1], intrinsic.shape[2:]
    out = _joined_buffer(intrinsic, ghosts)
    if intrinsic_bias is None:
        out[:, :m].copy_(intrinsic)
    else:
        torch.add(intrinsic, intrinsic_bias.view(1, -1, *[1] * len(spatial)), out=out[:, :m])
    out[:, m:].copy_(ghosts)
    return out


def per_channel_affine(
    intrinsic: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """A 1x1 depthwise convolution with one output per channel, as one elementwise op."""
    shape = (1, -1, *[1] * (intrinsic.dim() - 2))
    scale = weight.reshape(shape)
    if bias is None:
        return intrinsic * scale
    return torch.addcmul(bias.reshape(shape), intrinsic, scale)


def write_affine_halves(
    intrinsic: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``cat([intrinsic, per_channel_affine(intrinsic, weight, bias)], 1)`` in one pass: both
    halves are one broadcast ``addcmul`` (scale 1 and shift 0 for the intrinsic half) into a new
    buffer in the input's layout, read once; no autograd (out= writes)."""
    n, m, *spatial = intrinsic.shape
    layout = _layout(intrinsic)
    out = torch.empty(
        (n, 2 * m, *spatial), dtype=intrinsic.dtype, device=intrinsic.device, memory_format=layout
    )
    scale = torch.stack([torch.ones_like(weight.reshape(m)), weight.reshape(m)])
    shift = torch.zeros_like(scale)
    if bias is not None:
        shift[1] = bias
    if layout == torch.contiguous_format:  # (n, 2, m, *spatial): halves along dim 1
        halves = out.view(n, 2, m, *spatial)
        source = intrinsic.unsqueeze(1)
        fit = (1, 2, m, *[1] * len(spatial))
    else:  # channels last: (n, *spatial, 2, m), the channels innermost
        order = (0, *range(2, 2 + len(spatial)), 1)
        halves = out.permute(order).view(n, *spatial, 2, m)
        source = intrinsic.permute(order).unsqueeze(-2)
        fit = (2, m)
    torch.addcmul(shift.view(fit), source, scale.view(fit), out=halves)
    return out


def _layout(tensor: torch.Tensor) -> torch.memory_format:
    """channels_last when ``tensor`` is (a 4-D tensor with more than one channel), else NCHW."""
    if tensor.dim() == 4 and tensor.shape[1] > 1 and tensor.stride(1) == 1:
        return torch.channels_last
    if tensor.dim() == 5 and tensor.shape[1] > 1 and tensor.stride(1) == 1:
        return torch.channels_last_3d
    return torch.contiguous_format


def is_permutation(order: torch.Tensor, size: int) -> bool:
    """Whether ``order`` holds each of ``0 .. size - 1`` exactly once."""
    if order.dim() != 1 or len(order) != size:
        return False
    if size == 0:
        return True
    values = order.cpu().numpy()  # a few small numpy calls: torch's cost 10x more per call
    if values.min() < 0 or values.max() >= size:
        return False
    return bool((np.bincount(values, minlength=size) == 1).all())


def inverse_permutation(order: torch.Tensor) -> torch.Tensor:
    """The inverse permutation of ``order`` (``inverse[order[i]] = i``), on its device."""
    if order.is_meta:
        return torch.empty_like(order)
    values = order.cpu().numpy()
    inverse = np.empty_like(values)
    inverse[values] = np.arange(len(values))
    return torch.from_numpy(inverse).to(order.device)


def _joined_buffer(intrinsic: torch.Tensor, ghosts: torch.Tensor) -> torch.Tensor:
    """An empty output for both halves, in the intrinsic half's memory layout."""
    n, m, *spatial = intrinsic.shape
    return torch.empty(
        (n, m + ghosts.shape[1], *spatial),
        dtype=intrinsic.dtype,
        device=intrinsic.device,
        memory_format=_layout(intrinsic),
    )
