"""timm's convolution subclasses, converted exactly: weight standardisation and TF "same" padding.

Each of them computes every output channel on its own: weight standardisation normalises each
filter by its own mean and variance, scaled standardisation multiplies it by its own gain, and
TF "same" padding depends only on the input size. So the primary layer is the same class with the
kept filters (and gains), and the ghosts are fitted on the filters as the layer applies them.
Registered lazily by ``conv_types`` once timm is imported; ``timm_conv_types`` imports timm
(this module itself does not).
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F
from torch import nn

from .primary import ConvType, scale_weight_and_bias, slice_output_channels


def _standardised(conv: nn.Module, gain: torch.Tensor | None = None) -> torch.Tensor:
    """The filters as timm's StdConv2d / ScaledStdConv2d forward computes them."""
    weight = conv.weight
    return F.batch_norm(
        weight.reshape(1, conv.out_channels, -1),
        None,
        None,
        weight=gain,
        training=True,
        momentum=0.0,
        eps=conv.eps,
    ).reshape_as(weight)


def _scaled_standardised(conv: nn.Module) -> torch.Tensor:
    return _standardised(conv, (conv.gain * conv.scale).view(-1))


def _keep(*names: str):
    return lambda original, keep: slice_output_channels(original, keep, names)


@torch.no_grad()
def _scale_gain(layer: nn.Module, scale: torch.Tensor) -> None:
    """A scaled-standardised layer's output scales with its gain (the weight is normalised)."""
    layer.gain.mul_(scale.to(layer.gain).view_as(layer.gain))
    if layer.bias is not None:
        layer.bias.mul_(scale.to(layer.bias))


def timm_conv_types() -> list[ConvType]:
    """The conv types of the installed timm's subclasses (those this timm version has)."""
    # timm.layers re-exports a *function* named conv2d_same: import the modules by path.
    conv2d_same = importlib.import_module("timm.layers.conv2d_same")
    std_conv = importlib.import_module("timm.layers.std_conv")

    plain = {"primary": _keep("weight", "bias"), "permute_inputs": True}
    scaled = {"primary": _keep("weight", "bias", "gain"), "permute_inputs": True}
    candidates = [
        (conv2d_same, "Conv2dSame", plain, lambda c: c.weight, scale_weight_and_bias),
        (std_conv, "StdConv2d", plain, _standardised, None),
        (std_conv, "StdConv2dSame", plain, _standardised, None),
        (std_conv, "ScaledStdConv2d", scaled, _scaled_standardised, _scale_gain),
        (std_conv, "ScaledStdConv2dSame", scaled, _scaled_standardised, _scale_gain),
    ]
    types = []
    for module, name, common, effective, scaler in candidates:
        cls = getattr(module, name, None)
        if cls is not None:
            types.append(ConvType(cls, effective_weight=effective, scale_channels=scaler, **common))
    return types
