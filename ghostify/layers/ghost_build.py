"""Building a GhostModule's parts: its convolutions, left uninitialised for a caller about to
overwrite them, and a module standing for a given convolution (``GhostModule.like``)."""

from __future__ import annotations

from typing import Any, TypeVar

import torch
from torch import nn

from .conv_types import build_primary, conv_type_of, default_keep

_Module = TypeVar("_Module", bound=nn.Module)


def new_conv(cls: type[nn.Module], empty: bool, *args: Any, **kwargs: Any) -> nn.Module:
    """``cls(*args, **kwargs)``; with ``empty``, its parameters are left as allocated
    (uninitialised), for a caller about to overwrite them all. torch's random initialisation
    costs as much as a small fit, and even on the meta device its Python reference ops take
    half of ResNet-50's module building."""
    if not empty:
        return cls(*args, **kwargs)
    layer = cls.__new__(cls)
    layer.reset_parameters = _leave_uninitialised  # an instance attribute hides the method...
    cls.__init__(layer, *args, **kwargs)  # ...that __init__ calls last
    del layer.reset_parameters
    return layer


def _leave_uninitialised() -> None:
    pass


def build_like(
    target: type[_Module], conv: nn.Module, ratio: int, dw_size: int, *, empty: bool
) -> _Module:
    """A ``target`` (the GhostModule class for ``conv``'s dimensions) with ``conv``'s settings,
    device, dtype, gradient flags and mode; see ``GhostModule.like``. The class comes from the
    caller so that this module needs nothing of ``ghost_module``."""
    weight = conv.weight
    module = target(
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
        empty=empty,
    )
    for name, param in module.named_parameters():
        original = conv.bias if name.endswith("bias") and conv.bias is not None else weight
        param.requires_grad_(original.requires_grad)
    kind = conv_type_of(conv)
    if kind is not None and not kind.plain:
        keep = default_keep(module.out_channels, module.groups, module.intrinsic_channels)
        primary = build_primary(kind, conv, keep)
        if hasattr(primary, "reset_parameters"):  # fresh weights, as the plain primary has
            with torch.no_grad():
                primary.reset_parameters()
        module.primary_conv = primary
    if not conv.training:  # modules are built in training mode
        module.train(False)
    return module
