"""Fitting a GhostModule to the convolution it replaces: one entry point, ``fit``.

Data-free (weights only, ``data_free``) today's default; with activations, the cheap kernels are
then refitted by least squares on what the layer really sees (``activations``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..errors import ConfigError
from ..layers.conv_types import build_primary, conv_type_of, plain_type
from ..layers.ghost_module import GhostModule, check_conv
from .activations import refit_on_activations
from .data_free import fit_layout

__all__ = ["fit"]


@torch.no_grad()
def fit(
    original: nn.Module,
    ghost: GhostModule,
    activations: torch.Tensor | Iterable[torch.Tensor] | None = None,
) -> GhostModule:
    """Fit ``ghost`` to ``original`` in place and return it; ``original`` is not modified.

    Always: keep a subset of the original filters exactly in the primary conv, assign every other
    filter to a cheap-conv slot and fit its depthwise kernel to the filter (data-free), and set
    ``ghost``'s channel order so its outputs line up with ``original``'s. With ``activations``
    (inputs of ``original``: one tensor or an iterable of batches), the cheap kernels and biases
    are then refitted by least squares to ``original``'s outputs on those inputs.

    A registered conv subclass (``register_conv_type``) is fitted on its effective filters, and
    its kept filters go into a primary layer of its own kind; any other class is taken as plain.
    """
    check_conv(original)
    if activations is not None and ghost.dims != 2:
        raise ConfigError(f"fitting on activations supports 2-D layers; got a {ghost.dims}-D one")
    kind = conv_type_of(original) or plain_type(ghost.dims)
    weight = kind.effective_weight(original).detach()
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
    # The kept filters exactly, with every per-channel parameter of the layer's own kind.
    primary = build_primary(kind, original, layout.intrinsic)
    if type(primary) is not type(ghost.primary_conv):
        raise ConfigError(
            f"ghost's primary layer is a {type(ghost.primary_conv).__name__}; a "
            f"{type(original).__name__} needs a {type(primary).__name__}: build the module with "
            "GhostModule.like(original)"
        )
    ghost.primary_conv.load_state_dict(primary.state_dict())
    cheap = torch.zeros_like(ghost.cheap_conv.weight)
    cheap[layout.slot, 0] = layout.kernels.to(cheap.dtype)
    ghost.cheap_conv.weight.copy_(cheap)
    if bias is not None:
        # The kernel also scales its source's bias; cancel that and add the ghost's own.
        source = slot_source[layout.slot]
        gains = layout.kernels.flatten(1).sum(dim=1).to(bias.dtype)
        carried = gains * bias[layout.intrinsic][source]
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
