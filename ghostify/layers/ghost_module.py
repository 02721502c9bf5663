"""GhostModule: a primary conv makes 1/ratio of the channels, a cheap depthwise conv the rest."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.modules.utils import _ntuple

from ..errors import ConfigError
from ..options import check_dw_size, check_ratio, intrinsic_count, no_ghost_reason
from .conv_types import TORCH_CONVS, check_conv, conv_config, conv_dims
from .ghost_build import build_like, new_conv
from .ghost_fold import fold_batchnorm, fuse_internal_batchnorms
from .lean_backward import lean_forward, lean_forward_applies
from .modes import compiling, eager_inference
from .scatter import (
    inverse_permutation,
    is_permutation,
    per_channel_affine,
    scatter_channels,
    write_affine_halves,
    write_halves,
)

# fx traces scatter_channels as one call from this module (it branches on the input's layout,
# which a Proxy cannot); torch.fx.wrap patches the globals of the module that calls it.
torch.fx.wrap("scatter_channels")


_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
# Buffers that exist only when needed: the gather back to the original order, a folded bias.
_OPTIONAL_BUFFERS = ("channel_order", "intrinsic_bias")
_CONVS = {dims: cls for cls, dims in TORCH_CONVS.items()}
_BATCHNORMS = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


class GhostModule(nn.Module):
    """Drop-in replacement for ``nn.Conv2d`` producing the same output shape for every input.

    ``primary_conv`` keeps the original kernel, stride, padding, dilation, grouping and padding
    mode and computes ``intrinsic_channels`` = ceil(out / ratio) channels (with groups, rounded up
    so each group's ghosts come from its own kept filters: ``ghostify.options.intrinsic_count``).
    ``cheap_conv`` is one depthwise convolution with a channel multiplier
    (``groups=intrinsic_channels``, ``dw_size`` x ``dw_size``, stride 1, 'same' padding): ghost
    slot ``j`` is made from intrinsic channel ``j // multiplier``. It reads the primary output
    directly, so the forward pass is two convolutions and one concatenation, with no gather.

    The module's own output order is ``[intrinsic..., ghosts...]``. A module fitted to a trained
    conv keeps the original channel order either through the optional ``channel_order`` buffer
    (a gather after the concatenation) or, better, by having the layers that consume its output
    permuted once at conversion (``ghostify.convert`` does that where the model's graph allows);
    ``channel_order`` is None whenever the order is the identity, and then costs nothing.

    When ``out_channels`` is not a multiple of ``ratio`` the cheap conv makes up to
    ``intrinsic_channels - 1`` slots more than needed; the surplus is sliced off.

    By default the module is linear (no BatchNorm or activation), as a conversion needs: the host
    network's own BN and activation still follow it. ``batch_norm=True, relu=True`` gives the
    GhostNet block (BN + ReLU after both convolutions) for networks trained from scratch.

    The attributes ``in_channels``, ``out_channels``, ``kernel_size``, ``stride``, ``padding``,
    ``dilation``, ``groups``, ``padding_mode`` and ``has_bias`` describe the convolution this module
    stands for, so code that inspects ``module.out_channels`` keeps working.

    ``empty=True`` leaves the two convolutions' parameters uninitialised (as allocated), for a
    caller about to overwrite them all, as the fit does.

    This is the 2-D module; ``GhostModule1d`` and ``GhostModule3d`` are the same along 1 and 3
    spatial dimensions (``dims``) and subclass it, so ``isinstance(m, GhostModule)`` finds every
    ghost layer. ``like``/``from_conv`` pick the module matching the convolution's dimensions, and
    a primary of the convolution's own kind where its type is registered (``register_conv_type``).
    """

    dims = 2  # spatial dimensions of the convolution this module stands for
    join = "cat"  # how eager inference joins the halves (deploy sets it per layer)
    channel_order: torch.Tensor | None
    intrinsic_bias: torch.Tensor | None

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
        *,
        empty: bool = False,
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
        no_ghost = no_ghost_reason(out_channels, ratio, groups)
        if no_ghost is not None:
            raise ConfigError(no_ghost)
        intrinsic = intrinsic_count(out_channels, ratio, groups)
        ntuple = _ntuple(self.dims)
        kernel_size = ntuple(kernel_size)
        dilation = ntuple(dilation)
        if padding is None:  # centre the kernel, as the GhostNet code does
            padding = tuple((k - 1) // 2 * d for k, d in zip(kernel_size, dilation, strict=True))
        elif not isinstance(padding, str):
            padding = ntuple(padding)

        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = ntuple(stride)
        self.padding = padding
        self.dilation = dilation
        self.groups = groups
        self.padding_mode = padding_mode
        self.has_bias = bool(bias)
        self.ratio = ratio
        self.dw_size = dw_size
        self.intrinsic_channels = intrinsic
        self.ghost_channels = out_channels - intrinsic
        # Ghosts per intrinsic channel: ratio - 1, or fewer when groups rounded intrinsic up.
        self.multiplier = math.ceil(self.ghost_channels / intrinsic)

        factory = {"device": device, "dtype": dtype}
        conv_bias = self.has_bias and not batch_norm
        conv, batchnorm = _CONVS[self.dims], _BATCHNORMS[self.dims]
        self.primary_conv = new_conv(
            conv,
            empty,
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
        slots = intrinsic * self.multiplier
        self.cheap_conv = new_conv(
            conv,
            empty,
            intrinsic,
            slots,
            dw_size,
            1,
            dw_size // 2,
            groups=intrinsic,
            bias=conv_bias,
            **factory,
        )
        self.primary_bn = batchnorm(intrinsic, **factory) if batch_norm else nn.Identity()
        self.cheap_bn = batchnorm(slots, **factory) if batch_norm else nn.Identity()
        self.act = nn.ReLU(inplace=True) if relu else nn.Identity()
        self.register_buffer("channel_order", None)
        # The inverse of channel_order: the original channel of each module output (derived).
        self.register_buffer("_scatter_index", None, persistent=False)
        # Set by deploy(): the folded BatchNorm shifts of the intrinsic channels, added after the
        # cheap op has read them (its zero padding must not see them).
        self.register_buffer("intrinsic_bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if lean_forward_applies(self, x):  # training: a backward that keeps no intrinsic half
            return lean_forward(self, x)
        intrinsic = self.act(self.primary_bn(self.primary_conv(x)))
        if self._pointwise_cheap():  # a per-channel affine: elementwise, fused by compilers
            cheap = self.cheap_conv
            if self._joins_into_buffer() and self._one_ghost_per_intrinsic():
                return write_affine_halves(intrinsic, cheap.weight, cheap.bias)
            ghosts = per_channel_affine(intrinsic, cheap.weight, cheap.bias)
        else:
            ghosts = self.act(self.cheap_bn(self.cheap_conv(intrinsic)))
        if self.cheap_conv.out_channels != self.ghost_channels:  # surplus slots
            ghosts = ghosts[:, : self.ghost_channels]
        if self._joins_into_buffer():
            return write_halves(intrinsic, ghosts, self.intrinsic_bias)
        if self.intrinsic_bias is not None:  # set by deploy; the ghosts' shifts are in cheap_conv
            intrinsic = intrinsic + self.intrinsic_bias.view(1, -1, *[1] * self.dims)
        if self.channel_order is None:
            return torch.cat([intrinsic, ghosts], dim=1)
        if compiling():  # a compiler fuses the gather into the concatenation; ONNX: one Gather
            return torch.cat([intrinsic, ghosts], dim=1).index_select(1, self.channel_order)
        # Eager: one scattered write per half, no concatenation then gather (two copies).
        return scatter_channels(intrinsic, ghosts, self._scatter_index)

    def _pointwise_cheap(self) -> bool:
        """Whether the cheap op is one scale (and shift) per intrinsic channel: a 1x1 depthwise
        torch conv, one slot per intrinsic channel, nothing after it, nothing watching it."""
        cheap = self.cheap_conv
        return (
            self.dw_size == 1
            and cheap.out_channels == self.intrinsic_channels
            and type(cheap) in TORCH_CONVS
            and not (cheap._forward_hooks or cheap._forward_pre_hooks)
            and isinstance(self.cheap_bn, nn.Identity)
            and isinstance(self.act, nn.Identity)
        )

    def _one_ghost_per_intrinsic(self) -> bool:
        """No intrinsic bias and as many ghosts as intrinsic channels: the halves stack."""
        return self.intrinsic_bias is None and self.ghost_channels == self.intrinsic_channels

    def _joins_into_buffer(self) -> bool:
        return self.join == "buffer" and self.channel_order is None and eager_inference()

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        # The optional buffers follow the state_dict: a saved gather or folded bias is created
        # here to be filled, and one the state_dict does not hold is dropped (e.g. folded away).
        for name in _OPTIONAL_BUFFERS:
            saved = state_dict.get(prefix + name)
            if saved is not None and getattr(self, name) is None:
                setattr(self, name, torch.empty_like(saved, device=self.primary_conv.weight.device))
            elif saved is None:
                setattr(self, name, None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._sync_scatter_index()

    # -- channel layout --------------------------------------------------------------------------

    @property
    def slot_source(self) -> torch.Tensor:
        """For each ghost output (module order), the intrinsic channel its cheap kernel reads."""
        return torch.arange(self.ghost_channels) // self.multiplier

    def set_channel_order(self, order: torch.Tensor | None) -> None:
        """Gather the outputs into ``order`` (``out[:, c] = module_out[:, order[c]]``).

        An identity order (or None) removes the gather altogether.
        """
        if order is not None:
            order = torch.as_tensor(order, dtype=torch.long, device=self.primary_conv.weight.device)
            if not is_permutation(order, self.out_channels):
                raise ConfigError(
                    f"channel order must be a permutation of range({self.out_channels}); got "
                    f"{order.tolist()!r}"
                )
            if np.array_equal(order.cpu().numpy(), np.arange(self.out_channels)):
                order = None
        self.channel_order = order
        self._sync_scatter_index()

    def _set_fitted_order(self, position: np.ndarray) -> None:
        """``set_channel_order`` for a permutation the fit has just built, not checked again
        (with the check, setting the order was over a third of writing a fitted layer)."""
        increasing = (position[1:] > position[:-1]).all()  # the identity
        device = self.primary_conv.weight.device
        self.channel_order = None if increasing else torch.from_numpy(position).to(device)
        self._sync_scatter_index()

    def _sync_scatter_index(self) -> None:
        order = self.channel_order
        if order is None:
            self._scatter_index = None
            return
        self._scatter_index = inverse_permutation(order)

    @property
    def output_position(self) -> torch.Tensor:
        """Where each original channel ``c`` sits in the module's own output order."""
        if self.channel_order is None:
            return torch.arange(self.out_channels)
        return self.channel_order.cpu()

    @property
    def intrinsic_index(self) -> torch.Tensor:
        """Original output channels computed by the primary conv (exact copies after fitting)."""
        return torch.nonzero(self.output_position < self.intrinsic_channels).flatten()

    def conv_config(self) -> dict[str, Any]:
        """JSON-able keyword arguments of ``nn.ConvNd`` for the convolution this module replaces."""
        config = conv_config(self.primary_conv)
        config.update(out_channels=self.out_channels, bias=self.has_bias)
        return config

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, ratio={self.ratio}, dw_size={self.dw_size}, "
            f"intrinsic={self.intrinsic_channels}, ghost={self.ghost_channels}"
        )

    # -- deploy ------------------------------------------------------------------------------------

    def fold_batchnorm(self, bn: nn.modules.batchnorm._BatchNorm) -> None:
        """Fold an eval-mode BatchNorm that follows this module into it, exactly, in place
        (``ghostify.layers.ghost_fold.fold_batchnorm``)."""
        fold_batchnorm(self, bn)

    def fuse_internal_batchnorms(self) -> bool:
        """Fold the GhostNet-style internal BatchNorms (``batch_norm=True``) into the convs."""
        return fuse_internal_batchnorms(self)

    @classmethod
    def from_conv(
        cls,
        conv: nn.Module,
        ratio: int = 2,
        dw_size: int = 3,
        init: str = "weights",
    ) -> GhostModule:
        """Build a GhostModule with ``conv``'s configuration, device, dtype and training state.

        ``init="weights"`` keeps a subset of ``conv``'s filters exactly and fits each ghost
        channel's depthwise kernel to its original filter (data-free, see ``ghostify.fit``);
        ``init="scratch"`` keeps PyTorch's default initialisation. ``conv`` is never modified.
        """
        from ..fit import fit  # the fitting stage builds on this layer, not the other way round
        from ..options import check_init

        check_init(init)
        module = cls.like(conv, ratio=ratio, dw_size=dw_size, empty=init == "weights")
        if init == "weights":
            fit(conv, module)
        return module

    @classmethod
    def like(
        cls, conv: nn.Module, ratio: int = 2, dw_size: int = 3, *, empty: bool = False
    ) -> GhostModule:
        """An unfitted GhostModule standing for ``conv``: same settings, device, dtype, modes.

        The module matches ``conv``'s dimensions (``GhostModule.like(conv1d)`` is a
        ``GhostModule1d``). For a registered conv subclass the primary layer is of ``conv``'s own
        kind (``register_conv_type``), freshly initialised; any other class gets torch's conv.
        ``empty=True`` leaves the parameters uninitialised, for a caller about to overwrite all
        of them (the fit): PyTorch's random initialisation costs as much as a small fit.
        """
        check_conv(conv)
        target = cls._for_dims(conv_dims(conv))
        return build_like(target, conv, ratio, dw_size, empty=empty)

    @classmethod
    def _for_dims(cls, dims: int) -> type[GhostModule]:
        """The GhostModule class for ``dims`` spatial dimensions, when called on ``cls``."""
        if cls.dims == dims:
            return cls
        if cls is GhostModule:
            return GHOST_MODULES[dims]
        raise ConfigError(
            f"{cls.__name__} stands for {cls.dims}-D convolutions; got a {dims}-D one (use "
            "GhostModule.like, which picks the module for the convolution's dimensions)"
        )


class GhostModule1d(GhostModule):
    """GhostModule for ``nn.Conv1d`` (audio, time series): the same layout along one dimension."""

    dims = 1


class GhostModule3d(GhostModule):
    """GhostModule for ``nn.Conv3d`` (video, volumes): the cheap op is dw_size^3 depthwise."""

    dims = 3


GHOST_MODULES: dict[int, type[GhostModule]] = {1: GhostModule1d, 2: GhostModule, 3: GhostModule3d}
