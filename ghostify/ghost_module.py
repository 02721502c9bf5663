"""GhostModule: a primary conv makes 1/ratio of the channels, a cheap depthwise conv the rest."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.modules.utils import _pair

from . import weight_fit
from .errors import ConfigError
from .options import check_dw_size, check_init, check_ratio, intrinsic_count

_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


class GhostModule(nn.Module):
    """Drop-in replacement for ``nn.Conv2d`` producing the same output shape for every input.

    ``primary_conv`` keeps the original kernel, stride, padding, dilation, grouping and padding
    mode and computes ``intrinsic_channels`` = ceil(out / ratio) channels (rounded up to a multiple
    of ``groups``). ``cheap_conv`` is a depthwise ``dw_size`` x ``dw_size`` convolution (stride 1,
    'same' padding) that makes each of the remaining ``ghost_channels`` from one intrinsic channel,
    chosen by the ``ghost_source`` buffer. The concatenation is put back in the original channel
    order by the ``channel_order`` buffer, so a module fitted to a trained conv keeps its layout.

    Exactly ``out_channels`` channels are computed: the paper's ``ratio - 1`` ghosts per intrinsic
    channel followed by a slice would register parameters whose outputs are thrown away.

    By default the module is linear (no BatchNorm or activation), as a conversion needs: the host
    network's own BN and activation still follow it. ``batch_norm=True, relu=True`` gives the
    GhostNet block (BN + ReLU after both convolutions) for networks trained from scratch.

    The attributes ``in_channels``, ``out_channels``, ``kernel_size``, ``stride``, ``padding``,
    ``dilation``, ``groups``, ``padding_mode`` and ``has_bias`` describe the convolution this module
    stands for, so code that inspects ``module.out_channels`` keeps working.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int] = 1,
        ratio: int = 2,
        dw_size: int = 3,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str | None = None,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = False,
        padding_mode: str = "zeros",
        batch_norm: bool = False,
        relu: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_ratio(ratio)
        check_dw_size(dw_size)
        if padding_mode not in _PADDING_MODES:
            raise ConfigError(f"padding_mode must be one of {_PADDING_MODES}; got {padding_mode!r}")
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive int; got {value!r}")
        if (
            not isinstance(groups, int)
            or groups < 1
            or in_channels % groups
            or out_channels % groups
        ):
            raise ConfigError(
                f"groups must be a positive int dividing in_channels={in_channels} and "
                f"out_channels={out_channels}; got {groups!r}"
            )
        intrinsic = intrinsic_count(out_channels, ratio, groups)
        if intrinsic >= out_channels:
            raise ConfigError(
                f"out_channels={out_channels} with ratio={ratio} and groups={groups} leaves no "
                f"ghost channels: the primary convolution alone needs {intrinsic} channels"
            )
        kernel_size = _pair(kernel_size)
        dilation = _pair(dilation)
        if padding is None:  # centre the kernel, as the GhostNet code does
            padding = tuple((k - 1) // 2 * d for k, d in zip(kernel_size, dilation, strict=True))
        elif not isinstance(padding, str):
            padding = _pair(padding)

        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = _pair(stride)
        self.padding = padding
        self.dilation = dilation
        self.groups = groups
        self.padding_mode = padding_mode
        self.has_bias = bool(bias)
        self.ratio = ratio
        self.dw_size = dw_size
        self.intrinsic_channels = intrinsic
        self.ghost_channels = out_channels - intrinsic

        factory = {"device": device, "dtype": dtype}
        conv_bias = self.has_bias and not batch_norm
        self.primary_conv = nn.Conv2d(
            in_channels,
            intrinsic,
            kernel_size,
            self.stride,
            padding,
            dilation,
            groups,
            bias=conv_bias,
            padding_mode=padding_mode,
            **factory,
        )
        self.cheap_conv = nn.Conv2d(
            self.ghost_channels,
            self.ghost_channels,
            dw_size,
            1,
            dw_size // 2,
            groups=self.ghost_channels,
            bias=conv_bias,
            **factory,
        )
        self.primary_bn = nn.BatchNorm2d(intrinsic, **factory) if batch_norm else nn.Identity()
        self.cheap_bn = (
            nn.BatchNorm2d(self.ghost_channels, **factory) if batch_norm else nn.Identity()
        )
        self.act = nn.ReLU(inplace=True) if relu else nn.Identity()
        # Paper layout: ghost j comes from intrinsic j // (ratio - 1), spread evenly when rounded.
        source = torch.arange(self.ghost_channels) * intrinsic // self.ghost_channels
        self.register_buffer("ghost_source", source.to(device))
        self.register_buffer("channel_order", torch.arange(out_channels, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        intrinsic = self.act(self.primary_bn(self.primary_conv(x)))
        ghosts = self.act(
            self.cheap_bn(self.cheap_conv(intrinsic.index_select(1, self.ghost_source)))
        )
        return torch.cat([intrinsic, ghosts], dim=1).index_select(1, self.channel_order)

    @property
    def intrinsic_index(self) -> torch.Tensor:
        """Original output channels computed by the primary conv (exact copies after fitting)."""
        return torch.nonzero(self.channel_order < self.intrinsic_channels).flatten()

    def conv_config(self) -> dict[str, Any]:
        """JSON-able keyword arguments of ``nn.Conv2d`` for the convolution this module replaces."""
        config = conv_config(self.primary_conv)
        config.update(out_channels=self.out_channels, bias=self.has_bias)
        return config

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, ratio={self.ratio}, dw_size={self.dw_size}, "
            f"intrinsic={self.intrinsic_channels}, ghost={self.ghost_channels}"
        )

    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        ratio: int = 2,
        dw_size: int = 3,
        init: str = "weights",
    ) -> GhostModule:
        """Build a GhostModule with ``conv``'s configuration, device, dtype and training state.

        ``init="weights"`` keeps a subset of ``conv``'s filters exactly and fits each ghost
        channel's depthwise kernel to its original filter (data-free); ``init="scratch"`` keeps
        PyTorch's default initialisation. ``conv`` itself is never modified.
        """
        check_init(init)
        check_conv(conv)
        weight = conv.weight
        module = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            ratio=ratio,
            dw_size=dw_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            device=weight.device,
            dtype=weight.dtype,
        )
        if init == "weights":
            with torch.no_grad():
                module._fit_to(weight.detach(), None if conv.bias is None else conv.bias.detach())
        for name, param in module.named_parameters():
            original = conv.bias if name.endswith("bias") and conv.bias is not None else weight
            param.requires_grad_(original.requires_grad)
        module.train(conv.training)
        return module

    def _fit_to(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Copy the chosen filters into the primary conv and fit the cheap kernels to the rest."""
        per_group = self.intrinsic_channels // self.groups
        intrinsic = weight_fit.select_intrinsic(weight, self.groups, per_group).to(weight.device)
        is_ghost = torch.ones(self.out_channels, dtype=torch.bool, device=weight.device)
        is_ghost[intrinsic] = False
        ghosts = torch.nonzero(is_ghost).flatten()
        source, kernels = weight_fit.fit_ghosts(
            weight, intrinsic, ghosts, self.groups, self.stride, self.dilation, self.dw_size
        )
        self.primary_conv.weight.copy_(weight[intrinsic])
        self.cheap_conv.weight.copy_(kernels.unsqueeze(1).to(weight.dtype))
        if bias is not None:
            self.primary_conv.bias.copy_(bias[intrinsic])
            # The kernel also scales the source's bias; cancel that and add the ghost's own.
            carried = kernels.sum(dim=(1, 2)).to(bias.dtype) * bias[intrinsic][source]
            self.cheap_conv.bias.copy_(bias[ghosts] - carried)
        self.ghost_source.copy_(source)
        # Concatenated position of original channel c: intrinsic ones first, then the ghosts.
        position = torch.cat([intrinsic, ghosts]).argsort()
        self.channel_order.copy_(position)


def check_conv(conv: object) -> None:
    """Raise a ConfigError unless ``conv`` is an initialised ``nn.Conv2d`` (or subclass)."""
    if not isinstance(conv, nn.Conv2d):
        raise ConfigError(f"expected an nn.Conv2d, got {type(conv).__name__}")
    if isinstance(conv, nn.modules.lazy.LazyModuleMixin) and conv.has_uninitialized_params():
        raise ConfigError(
            f"{type(conv).__name__} has not been initialised yet: run one forward pass through the "
            "model (so its in_channels and weights exist) before converting it"
        )


def conv_config(conv: nn.Conv2d) -> dict[str, Any]:
    """JSON-able ``nn.Conv2d`` keyword arguments describing ``conv``."""
    padding = conv.padding if isinstance(conv.padding, str) else list(conv.padding)
    return {
        "in_channels": conv.in_channels,
        "out_channels": conv.out_channels,
        "kernel_size": list(conv.kernel_size),
        "stride": list(conv.stride),
        "padding": padding,
        "dilation": list(conv.dilation),
        "groups": conv.groups,
        "bias": conv.bias is not None,
        "padding_mode": conv.padding_mode,
    }
