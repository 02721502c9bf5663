"""Least-squares refit of a GhostModule's cheap kernels on real activations.

The primary conv's filters are exact copies, so its outputs ``P`` on an input batch are the
original layer's intrinsic outputs. Each ghost slot is ``kernel (*) P[source] + bias``: a linear
model in the ``dw_size**2`` taps plus the bias, whose least-squares solution needs only the Gram
matrix of ``P[source]``'s patches and their products with the original's ghost outputs. Both are
accumulated batch by batch, so memory does not grow with the number of images.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..layers.ghost_module import GhostModule

_RIDGE = 1e-6


def _batches(activations: torch.Tensor | Iterable[torch.Tensor]) -> Iterable[torch.Tensor]:
    if isinstance(activations, torch.Tensor):
        return [activations]
    return activations


@torch.no_grad()
def refit_on_activations(
    original: nn.Conv2d, ghost: GhostModule, activations: torch.Tensor | Iterable[torch.Tensor]
) -> GhostModule:
    """Refit ``ghost``'s cheap kernels and biases to ``original`` on the given input batches."""
    k = ghost.dw_size
    m = ghost.intrinsic_channels
    with_bias = ghost.cheap_conv.bias is not None
    taps = k * k + int(with_bias)  # the kernel's taps, and a constant for the bias if it has one
    source = ghost.slot_source.to(ghost.primary_conv.weight.device)
    slots = ghost.ghost_channels
    # Module output position of every original channel, and the inverse.
    position = ghost.output_position.to(source.device)
    channel_at = torch.empty_like(position)
    channel_at[position] = torch.arange(ghost.out_channels, device=position.device)
    gram = torch.zeros(m, taps, taps, dtype=torch.float64, device=source.device)
    cross = torch.zeros(slots, taps, dtype=torch.float64, device=source.device)
    seen = 0
    for x in _batches(activations):
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != ghost.in_channels:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ConfigError(
                f"activations must be (N, {ghost.in_channels}, H, W) inputs of the layer; got {got}"
            )
        target = original(x)[:, channel_at[m:]].double()  # ghost outputs, in slot order
        intrinsic = ghost.primary_conv(x).double()
        n, _, h, w = intrinsic.shape
        patches = F.unfold(intrinsic, k, padding=k // 2).view(n, m, k * k, h * w)
        features = patches
        if with_bias:
            features = torch.cat([patches, patches.new_ones(n, m, 1, h * w)], dim=2)
        gram += torch.einsum("nmtp,nmup->mtu", features, features)
        cross += torch.einsum("nstp,nsp->st", features[:, source], target.flatten(2))
        seen += n
    if seen == 0:
        raise ConfigError("activations held no batch: pass at least one input tensor")
    system = gram[source]
    scale = system.diagonal(dim1=1, dim2=2).mean(dim=1).clamp_min(1e-12)
    eye = torch.eye(taps, dtype=system.dtype, device=system.device)
    solution = torch.linalg.solve(
        system + (_RIDGE * scale)[:, None, None] * eye, cross.unsqueeze(-1)
    ).squeeze(-1)
    weight = ghost.cheap_conv.weight
    weight[:slots, 0] = solution[:, : k * k].view(slots, k, k).to(weight.dtype)
    if with_bias:
        ghost.cheap_conv.bias[:slots] = solution[:, -1].to(weight.dtype)
    return ghost
