"""The primary layer of a GhostModule: how a convolution class builds it (``ConvType``).

A conv type says how to build the *primary* layer from an original convolution (the same kind of
layer, computing exactly the original's output channels ``keep``) and how to read the filters the
layer really applies. The builders every conv type shares live here too: slicing a layer's output
channels, torch's own convolution holding the kept filters, and scaling output channels. The
registry of known classes is ``conv_types``; timm's classes are in ``timm_convs``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError

PrimaryBuilder = Callable[[nn.Module, torch.Tensor], nn.Module]
WeightReader = Callable[[nn.Module], torch.Tensor]
ChannelScaler = Callable[[nn.Module, torch.Tensor], None]

TORCH_CONVS: dict[type, int] = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)


@dataclass(frozen=True)
class ConvType:
    """How to convert one convolution class exactly.

    ``primary(original, keep)`` returns a new layer of the same kind computing exactly
    ``original``'s output channels ``keep`` (a LongTensor, sorted within each group), every
    per-output-channel parameter sliced; ``original`` must not change.
    ``effective_weight(original)`` returns the filters the layer applies, shaped like
    ``original.weight``, such that the layer
    computes ``conv(its own padding of x, effective_weight) + bias``. ``scale_channels(layer,
    scale)`` multiplies each output channel of a primary layer by ``scale`` in place (bias
    included), which BatchNorm folding needs; None when that cannot be done exactly (a
    standardised weight does not scale). ``permute_inputs``: permuting the weight's input
    channels (dim 1) permutes what the layer reads, so channel-order folding may edit it.
    """

    cls: type
    primary: PrimaryBuilder
    effective_weight: WeightReader
    scale_channels: ChannelScaler | None = None
    permute_inputs: bool = False

    @property
    def name(self) -> str:
        return qualified_name(self.cls)

    @property
    def plain(self) -> bool:
        """True when the primary is torch's own convolution (torch's classes, inherited ones)."""
        return self.primary is plain_primary


def qualified_name(cls: type) -> str:
    """``module.QualName`` of a class, as plans record conv types."""
    return f"{cls.__module__}.{cls.__qualname__}"


def conv_dims(module: nn.Module) -> int:
    """Spatial dimensions of a Conv1d/Conv2d/Conv3d (or subclass)."""
    for cls, dims in TORCH_CONVS.items():
        if isinstance(module, cls):
            return dims
    raise ConfigError(f"expected an nn.Conv1d, nn.Conv2d or nn.Conv3d; got {type(module).__name__}")


def slice_output_channels(
    original: nn.Module, keep: torch.Tensor, per_channel: Iterable[str] = ("weight", "bias")
) -> nn.Module:
    """A copy of ``original`` computing only its output channels ``keep``.

    The parameters and buffers named in ``per_channel`` are sliced along dim 0 (a missing one,
    such as an absent bias, is ignored), ``out_channels`` is set, hooks are dropped, everything
    else is copied. Parameters keep their ``requires_grad``.
    """
    keep = torch.as_tensor(keep, dtype=torch.long).flatten()
    count = getattr(original, "out_channels", None)
    if keep.numel() == 0 or (count is not None and (keep.min() < 0 or keep.max() >= count)):
        raise ConfigError(f"keep must index output channels 0..{count}; got {keep.tolist()!r}")
    memo: dict[int, object] = {}
    for name in per_channel:
        tensor = original._parameters.get(name, original._buffers.get(name))
        if tensor is None:
            continue
        sliced = tensor.detach().index_select(0, keep.to(tensor.device)).clone()
        if isinstance(tensor, nn.Parameter):
            sliced = nn.Parameter(sliced, requires_grad=tensor.requires_grad)
        memo[id(tensor)] = sliced
    built = copy.deepcopy(original, memo)
    built.out_channels = len(keep)
    for hooks in HOOK_DICTS:
        if hasattr(built, hooks):
            getattr(built, hooks).clear()
    return built


def plain_primary(original: nn.Module, keep: torch.Tensor) -> nn.Module:
    """torch's conv of ``original``'s dimensions holding its (effective) filters ``keep``."""
    weight = original.weight  # a parametrized layer's computed weight: what it applies
    cls = next(c for c, d in TORCH_CONVS.items() if d == conv_dims(original))
    primary = nn.utils.skip_init(
        cls,
        original.in_channels,
        len(keep),
        original.kernel_size,
        stride=original.stride,
        padding=original.padding,
        dilation=original.dilation,
        groups=original.groups,
        bias=original.bias is not None,
        padding_mode=original.padding_mode,
        device=weight.device,
        dtype=weight.dtype,
    )
    with torch.no_grad():
        index = keep.to(weight.device)
        primary.weight.copy_(weight.index_select(0, index))
        if original.bias is not None:
            primary.bias.copy_(original.bias.index_select(0, index))
    return primary


@torch.no_grad()
def scale_weight_and_bias(layer: nn.Module, scale: torch.Tensor) -> None:
    """``scale_channels`` for a layer whose output is linear in its weight (plain or padded)."""
    weight = layer.weight
    weight.mul_(scale.to(weight).view(-1, *[1] * (weight.dim() - 1)))
    if layer.bias is not None:
        layer.bias.mul_(scale.to(layer.bias))
