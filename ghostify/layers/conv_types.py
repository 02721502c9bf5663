"""The registry of convolution types a GhostModule can stand for, and lookups into it.

A conv type (``ConvType``, in ``primary``) says how to build the primary layer from an original
convolution and how to read the filters the layer really applies (``effective_weight``:
standardised, scaled, ...), on which the ghosts are fitted. torch's Conv1d/Conv2d/Conv3d are built
in; timm's weight-standardised and TF-"same" convolutions are registered the first time a layer is
looked up while timm is imported. Users declare their own with ``register_conv_type``, as
Torch-Pruning's customised pruners do.

Only exact classes match: a subclass of a registered class may compute something else.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import ConfigError, ConversionError
from .primary import (
    TORCH_CONVS,
    ChannelScaler,
    ConvType,
    PrimaryBuilder,
    WeightReader,
    conv_dims,
    plain_primary,
    qualified_name,
    scale_weight_and_bias,
    slice_output_channels,
)
from .timm_convs import timm_conv_types

__all__ = [  # the primary-layer names are re-exported: callers know them from here
    "TORCH_CONVS",
    "ConvType",
    "build_primary",
    "check_conv",
    "conv_class",
    "conv_config",
    "conv_dims",
    "conv_type_of",
    "default_keep",
    "plain_type",
    "qualified_name",
    "register_conv_type",
    "registered_conv_types",
    "scale_weight_and_bias",
    "slice_output_channels",
    "unregister_conv_type",
    "widen",
]

_REGISTRY: dict[type, ConvType] = {}
_LIBRARIES_SEEN: set[str] = set()


def register_conv_type(
    cls: type,
    *,
    primary: PrimaryBuilder,
    effective_weight: WeightReader,
    scale_channels: ChannelScaler | None = None,
    permute_inputs: bool = False,
) -> ConvType:
    """Declare how ``cls`` (a Conv1d/Conv2d/Conv3d subclass) converts exactly; see ``ConvType``.

    Registered layers are converted like built-ins: selected, fitted on their effective filters,
    rebuilt from plans and reported. Registering a class again replaces its entry (a user's entry
    also replaces ghostify's own for timm's classes). ``slice_output_channels`` builds most
    primaries in one line.
    """
    if not isinstance(cls, type) or not issubclass(cls, tuple(TORCH_CONVS)):
        raise ConfigError(
            f"register_conv_type needs a subclass of nn.Conv1d, nn.Conv2d or nn.Conv3d; got {cls!r}"
        )
    if cls in TORCH_CONVS:
        raise ConfigError(f"{cls.__name__} is built in; register a subclass of it instead")
    for argument, value in (("primary", primary), ("effective_weight", effective_weight)):
        if not callable(value):
            raise ConfigError(f"{argument} must be a callable; got {value!r}")
    if scale_channels is not None and not callable(scale_channels):
        raise ConfigError(f"scale_channels must be a callable or None; got {scale_channels!r}")
    entry = ConvType(cls, primary, effective_weight, scale_channels, bool(permute_inputs))
    _REGISTRY[cls] = entry
    return entry


def unregister_conv_type(cls: type) -> None:
    """Forget a registered class (its layers are then skipped again, as unknown subclasses)."""
    if cls in TORCH_CONVS:
        raise ConfigError(f"{cls.__name__} is built in and cannot be unregistered")
    _REGISTRY.pop(cls, None)


def registered_conv_types() -> dict[type, ConvType]:
    """Every conv type known now, built-ins included."""
    _register_libraries()
    return dict(_REGISTRY)


def conv_class(module: nn.Module) -> type:
    """The class a conv layer was defined as (through torch's parametrization wrapper)."""
    cls = type(module)
    if parametrize.is_parametrized(module):
        cls = cls.__bases__[0]  # ParametrizedConv2d wraps the user's class
    return cls


def conv_type_of(module: nn.Module) -> ConvType | None:
    """The conv type of ``module``'s exact class, or None when it is not known.

    A class is known when it is registered, or when it inherits torch's convolution unchanged:
    it overrides neither ``forward`` nor ``_conv_forward`` and holds its weight as a parameter
    (torchvision's ``Conv3DSimple`` only sets arguments in ``__init__``). A parametrized layer of
    a subclass is not matched: its primary would have to carry the parametrization too.
    """
    _register_libraries()
    cls = conv_class(module)
    if cls is not type(module) and cls not in TORCH_CONVS:
        return None
    entry = _REGISTRY.get(cls)
    if entry is None and _inherits_convolution(module):
        entry = dataclasses.replace(plain_type(conv_dims(module)), cls=cls)
    return entry


def _inherits_convolution(module: nn.Module) -> bool:
    """True when ``module``'s class runs torch's own convolution code on a real weight."""
    base = next((c for c in TORCH_CONVS if isinstance(module, c)), None)
    if base is None:  # not a Conv1d/2d/3d at all: a transposed conv, say
        return False
    same_code = all(
        getattr(type(module), method) is getattr(base, method)
        for method in ("forward", "_conv_forward", "__call__", "__getattr__")
    )
    return same_code and isinstance(module._parameters.get("weight"), nn.Parameter)


def plain_type(dims: int) -> ConvType:
    """The built-in conv type of torch's convolution with ``dims`` spatial dimensions."""
    return next(entry for cls, entry in _REGISTRY.items() if TORCH_CONVS.get(cls) == dims)


def build_primary(kind: ConvType, original: nn.Module, keep: torch.Tensor) -> nn.Module:
    """``kind.primary(original, keep)``, checked: a module with the kept channel count."""
    try:
        built = kind.primary(original, keep)
    except Exception as error:
        raise ConversionError(
            f"building the primary layer of a {kind.name} failed: {type(error).__name__}: {error}"
        ) from error
    if not isinstance(built, nn.Module) or getattr(built, "out_channels", None) != len(keep):
        got = getattr(built, "out_channels", type(built).__name__)
        raise ConversionError(
            f"the primary of a {kind.name} must be a module with out_channels={len(keep)} (the "
            f"kept channels); its registered primary() returned {got!r}"
        )
    return built


def default_keep(out_channels: int, groups: int, intrinsic: int) -> torch.Tensor:
    """The first ``intrinsic // groups`` output channels of every group: a valid ``keep``."""
    per_group_out, per_group_kept = out_channels // groups, intrinsic // groups
    return torch.cat(
        [torch.arange(per_group_kept) + group * per_group_out for group in range(groups)]
    )


def widen(primary: nn.Module, out_channels: int) -> nn.Module:
    """A zero-weight copy of ``primary`` with ``out_channels`` outputs: the original's cost.

    Every parameter and buffer whose first dimension is ``primary.out_channels`` is replaced by
    zeros with ``out_channels`` rows. For counting MACs and parameters only.
    """
    count = primary.out_channels
    memo: dict[int, object] = {}
    for tensor in [*primary.parameters(recurse=False), *primary.buffers(recurse=False)]:
        if tensor.dim() >= 1 and tensor.shape[0] == count:
            zeros = tensor.new_zeros((out_channels, *tensor.shape[1:]))
            if isinstance(tensor, nn.Parameter):
                zeros = nn.Parameter(zeros, requires_grad=False)
            memo[id(tensor)] = zeros
    wide = copy.deepcopy(primary, memo)
    wide.out_channels = out_channels
    return wide


# -- built-ins -------------------------------------------------------------------------------------


for _cls in TORCH_CONVS:
    _REGISTRY[_cls] = ConvType(
        _cls, plain_primary, lambda conv: conv.weight, scale_weight_and_bias, True
    )


def _register_libraries() -> None:
    """Register the conv types of libraries that are imported (never importing one ourselves)."""
    if "timm" in sys.modules and "timm" not in _LIBRARIES_SEEN:
        _LIBRARIES_SEEN.add("timm")
        for entry in timm_conv_types():
            _REGISTRY.setdefault(entry.cls, entry)


def check_conv(conv: object) -> None:
    """Raise a ConfigError unless ``conv`` is an initialised Conv1d/Conv2d/Conv3d (or subclass)."""
    if not isinstance(conv, tuple(TORCH_CONVS)):
        raise ConfigError(
            f"expected an nn.Conv1d, nn.Conv2d or nn.Conv3d, got {type(conv).__name__}"
        )
    if isinstance(conv, nn.modules.lazy.LazyModuleMixin) and conv.has_uninitialized_params():
        raise ConfigError(
            f"{type(conv).__name__} has not been initialised yet: run one forward pass through the "
            "model (so its in_channels and weights exist) before converting it"
        )


def conv_config(conv: nn.Module) -> dict[str, Any]:
    """JSON-able ``nn.ConvNd`` keyword arguments describing ``conv`` (kernel_size gives dims)."""
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
