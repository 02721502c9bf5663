"""Writing a fitted layout into a GhostModule: kept filters, cheap kernels, biases, order."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError
from ..layers.conv_types import (
    TORCH_CONVS,
    ConvType,
    build_primary,
    conv_dims,
    conv_type_of,
    plain_type,
)
from ..layers.ghost_module import GhostModule
from .data_free import GhostLayout


def conv_kind(original: nn.Module, ghost: GhostModule) -> ConvType:
    """``original``'s conv type (a conv of unknown kind is fitted as plain)."""
    return conv_type_of(original) or plain_type(ghost.dims)


def write_layout(
    original: nn.Module,
    ghost: GhostModule,
    kind: ConvType,
    slot_source: torch.Tensor,
    layout: GhostLayout,
) -> None:
    """Copy the kept filters; set the cheap kernels, the biases and the channel order.
    ``kind`` is ``original``'s conv type, ``slot_source`` the ghost's (on the CPU)."""
    device = original.weight.device
    # The kept filters exactly, with every per-channel parameter of the layer's own kind.
    plain = kind.primary is plain_type(ghost.dims).primary
    if plain and TORCH_CONVS.get(type(ghost.primary_conv)) == conv_dims(original):
        # torch's conv: copy the rows straight in (building a layer to copy from costs more).
        index = layout.intrinsic.to(device)
        _copy_rows(original.weight, index, ghost.primary_conv.weight)
        if original.bias is not None:
            _copy_rows(original.bias, index, ghost.primary_conv.bias)
    else:
        primary = build_primary(kind, original, layout.intrinsic)
        if type(primary) is not type(ghost.primary_conv):
            raise ConfigError(
                f"ghost's primary layer is a {type(ghost.primary_conv).__name__}; a "
                f"{type(original).__name__} needs a {type(primary).__name__}: build the module "
                "with GhostModule.like(original)"
            )
        ghost.primary_conv.load_state_dict(primary.state_dict())
    cheap = ghost.cheap_conv.weight.zero_()  # surplus slots (if any) stay zero
    cheap[layout.slot, 0] = layout.kernels.to(cheap.dtype)
    if original.bias is not None:
        # The kernel also scales its source's bias; cancel that and add the ghost's own.
        bias = original.bias.detach()
        source = layout.intrinsic[slot_source.to(device)[layout.slot]]
        gains = layout.kernels.flatten(1).sum(dim=1).to(bias.dtype)
        cheap_bias = ghost.cheap_conv.bias.zero_()
        cheap_bias[layout.slot] = (bias[layout.ghosts] - gains * bias[source]).to(cheap_bias.dtype)
    # Module output position of original channel c: intrinsic ones first, then the slots.
    m = ghost.intrinsic_channels
    position = np.empty(ghost.out_channels, dtype=np.int64)
    position[layout.intrinsic.cpu().numpy()] = np.arange(m)
    position[layout.ghosts.cpu().numpy()] = m + layout.slot.cpu().numpy()
    ghost._set_fitted_order(position)


def _copy_rows(source: torch.Tensor, index: torch.Tensor, target: torch.Tensor) -> None:
    """``target[:] = source[index]``, written in place when the two match (no temporary)."""
    if source.dtype == target.dtype and source.device == target.device:
        torch.index_select(source, 0, index, out=target)
    else:
        target.copy_(source.index_select(0, index))
