"""Fitting a GhostModule to the convolution it replaces: one entry point, ``fit``.

Data-free (weights only, ``data_free``) today's default; with activations, the cheap kernels are
then refitted by least squares on what the layer really sees (``activations``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..layers.ghost_module import GhostModule, check_conv
from .activations import refit_on_activations
from .data_free import fit_layout

__all__ = ["fit"]


@torch.no_grad()
def fit(
    original: nn.Conv2d,
    ghost: GhostModule,
    activations: torch.Tensor | Iterable[torch.Tensor] | None = None,
) -> GhostModule:
    """Fit ``ghost`` to ``original`` in place and return it; ``original`` is not modified.

    Always: keep a subset of the original filters exactly in the primary conv, assign every other
    filter to a cheap-conv slot and fit its depthwise kernel to the filter (data-free), and set
    ``ghost``'s channel order so its outputs line up with ``original``'s. With ``activations``
    (inputs of ``original``: one tensor or an iterable of batches), the cheap kernels and biases
    are then refitted by least squares to ``original``'s outputs on those inputs.
    """
    check_conv(original)
    weight = original.weight.detach()
    bias = None if original.bias is None else original.bias.detach()
    slot_source = ghost.slot_source.to(weight.device)
    layout = fit_layout(
        weight,
        ghost.groups,
        ghost.intrinsic_channels,
        slot_source,
        ghost.stride,
        ghost.dilation,
        ghost.dw_size,
    )
    m = ghost.intrinsic_channels
    ghost.primary_conv.weight.copy_(weight[layout.intrinsic])
    cheap = torch.zeros_like(ghost.cheap_conv.weight)
    cheap[layout.slot, 0] = layout.kernels.to(cheap.dtype)
    ghost.cheap_conv.weight.copy_(cheap)
    if bias is not None:
        ghost.primary_conv.bias.copy_(bias[layout.intrinsic])
        # The kernel also scales its source's bias; cancel that and add the ghost's own.
        source = slot_source[layout.slot]
        carried = layout.kernels.sum(dim=(1, 2)).to(bias.dtype) * bias[layout.intrinsic][source]
        cheap_bias = torch.zeros_like(ghost.cheap_conv.bias)
        cheap_bias[layout.slot] = bias[layout.ghosts] - carried
        ghost.cheap_conv.bias.copy_(cheap_bias)
    # Module output position of original channel c: intrinsic ones first, then the slots.
    position = torch.empty(ghost.out_channels, dtype=torch.long, device=weight.device)
    position[layout.intrinsic] = torch.arange(m, device=weight.device)
    position[layout.ghosts] = m + layout.slot
    ghost.set_channel_order(position)
    if activations is not None:
        refit_on_activations(original, ghost, activations)
    return ghost
