"""Folding BatchNorms into a GhostModule exactly: the one after it, and GhostNet's internal ones."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from ..errors import ConfigError
from .conv_types import TORCH_CONVS, conv_type_of


@torch.no_grad()
def fold_batchnorm(ghost: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> None:
    """Fold an eval-mode BatchNorm that follows ``ghost`` into it, exactly, in place.

    With ``scale`` and ``shift`` the BatchNorm's per-channel affine, the primary conv is
    scaled by its channels' ``scale``, each cheap kernel by ``scale_ghost / scale_source``, and
    the ghosts' shifts become the cheap conv's bias (added after it, so outside its padding).
    The intrinsic channels' shifts cannot go into the primary conv: the cheap op would see
    them, and its zero padding would not. They go into ``intrinsic_bias``, added after the
    cheap op has read the primary output, so the extra pass covers only the intrinsic half;
    with a 1x1 cheap op (no padding) they move into the primary conv and cost nothing.
    Raises a ConfigError (module unchanged) when a BatchNorm scale that a ghost divides by
    is zero.
    """
    if ghost.training or bn.training or bn.running_mean is None:
        raise ConfigError("fold_batchnorm needs eval-mode modules and BatchNorm statistics")
    kind = conv_type_of(ghost.primary_conv)
    if kind is None or kind.scale_channels is None:
        raise ConfigError(
            f"the primary layer is a {type(ghost.primary_conv).__qualname__}, whose output "
            "cannot be rescaled exactly through its parameters (a standardised weight undoes "
            "any scale); leave this BatchNorm unfolded"
        )
    if not isinstance(ghost.primary_bn, nn.Identity) or not isinstance(ghost.act, nn.Identity):
        raise ConfigError("fold_batchnorm needs a linear GhostModule (batch_norm=relu=False)")
    if bn.num_features != ghost.out_channels:
        raise ConfigError(
            f"BatchNorm has {bn.num_features} channels; this module makes {ghost.out_channels}"
        )
    inv_std = torch.rsqrt(bn.running_var.double() + bn.eps)
    scale = inv_std * (bn.weight.double() if bn.weight is not None else 1.0)
    shift = -bn.running_mean.double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.double()
    # BatchNorm channels are the output's; the convolutions work in the module's own order.
    position = ghost.output_position.to(scale.device)
    scale = torch.empty_like(scale).index_copy_(0, position, scale)
    shift = torch.empty_like(shift).index_copy_(0, position, shift)
    m, ghosts = ghost.intrinsic_channels, ghost.ghost_channels
    source = ghost.slot_source.to(scale.device)
    if (scale[:m][source].abs() < 1e-12).any():
        raise ConfigError(
            "a BatchNorm scale of an intrinsic channel is zero: ghosts made from it cannot "
            "be rescaled; leave this BatchNorm unfolded"
        )
    cheap = ghost.cheap_conv.weight
    # Ghosts: y_g = s_g * (cheap(a) + b_g) + t_g, with the primary output a scaled by s_src.
    slots = cheap.shape[0]
    ghost_bias = torch.zeros(slots, dtype=torch.float64, device=scale.device)
    ghost_bias[:ghosts] = shift[m:]
    if ghost.cheap_conv.bias is not None:
        ghost_bias[:ghosts] += scale[m:] * ghost.cheap_conv.bias[:ghosts].double()
    # Intrinsic channels: y_i = s_i * (a + b_i) + t_i.
    intrinsic_bias = shift[:m]
    if ghost.intrinsic_bias is not None:
        intrinsic_bias = intrinsic_bias + scale[:m] * ghost.intrinsic_bias.double()
    # The primary's own bias is inside the cheap op's zero padding: scaled, never shifted.
    kind.scale_channels(ghost.primary_conv, scale[:m].to(cheap.dtype))
    ratios = (scale[m:] / scale[:m][source]).view(-1, *[1] * (cheap.dim() - 1))
    cheap[:ghosts].mul_(ratios.to(cheap.dtype))
    if ghost.dw_size == 1 and type(ghost.primary_conv) in TORCH_CONVS:
        # A 1x1 cheap op has no padding: cheap(a + b) = cheap(a) + w * b exactly, so the
        # intrinsic shift joins the primary's bias and the ghosts' bias pays it back.
        taps = cheap.reshape(slots, -1)[:, 0].double()
        slot_source = torch.arange(slots, device=scale.device) // ghost.multiplier
        ghost_bias -= taps * intrinsic_bias[slot_source]
        primary = ghost.primary_conv
        if primary.bias is None:
            primary.bias = nn.Parameter(torch.zeros(m, dtype=cheap.dtype, device=cheap.device))
        primary.bias.add_(intrinsic_bias.to(cheap.dtype))
        ghost.intrinsic_bias = None
    else:
        ghost.intrinsic_bias = intrinsic_bias.to(cheap.dtype)
    if ghost.cheap_conv.bias is None:
        ghost.cheap_conv.bias = nn.Parameter(torch.empty_like(ghost_bias, dtype=cheap.dtype))
    ghost.cheap_conv.bias.copy_(ghost_bias)


@torch.no_grad()
def fuse_internal_batchnorms(ghost: nn.Module) -> bool:
    """Fold the GhostNet-style internal BatchNorms (``batch_norm=True``) into the convs."""
    if isinstance(ghost.primary_bn, nn.Identity):
        return False
    ghost.primary_conv = fuse_conv_bn_eval(ghost.primary_conv, ghost.primary_bn)
    ghost.cheap_conv = fuse_conv_bn_eval(ghost.cheap_conv, ghost.cheap_bn)
    ghost.primary_bn, ghost.cheap_bn = nn.Identity(), nn.Identity()
    return True


@torch.no_grad()
def shrink_cheap_kernel(ghost: nn.Module) -> bool:
    """Make the cheap op 1x1 when every tap of its kernels but the centre is zero: exact (the
    zero taps add nothing, and a 1x1 op needs no padding). The data-free fit of a 1x1 layer
    leaves exactly such kernels. Returns whether it did; the module is unchanged otherwise."""
    cheap = ghost.cheap_conv
    if ghost.dw_size == 1 or type(cheap) not in TORCH_CONVS:
        return False
    outside = cheap.weight.clone()
    outside[(slice(None), slice(None), *[ghost.dw_size // 2] * ghost.dims)] = 0
    if outside.any():
        return False
    make_cheap_pointwise(ghost)
    return True


@torch.no_grad()
def make_cheap_pointwise(ghost: nn.Module) -> None:
    """Replace the cheap conv by a 1x1 one holding its kernels' centre taps (``dw_size=1``).

    Exact only when the other taps are zero (``shrink_cheap_kernel`` checks); a reloaded
    deployed checkpoint calls it directly, to rebuild the structure its weights were saved in.
    """
    cheap = ghost.cheap_conv
    centre = ghost.dw_size // 2
    pointwise = type(cheap)(
        cheap.in_channels,
        cheap.out_channels,
        1,
        groups=cheap.groups,
        bias=cheap.bias is not None,
        device=cheap.weight.device,
        dtype=cheap.weight.dtype,
    )
    taps = cheap.weight[(slice(None), slice(None), *[centre] * ghost.dims)]
    pointwise.weight.copy_(taps.reshape(pointwise.weight.shape))
    pointwise.weight.requires_grad_(cheap.weight.requires_grad)
    if cheap.bias is not None:
        pointwise.bias.copy_(cheap.bias)
        pointwise.bias.requires_grad_(cheap.bias.requires_grad)
    pointwise.train(cheap.training)
    ghost.cheap_conv = pointwise
    ghost.dw_size = 1
