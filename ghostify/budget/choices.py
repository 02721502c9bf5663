"""The forms a layer may take under a budget, and what each costs in MACs and parameters.

A layer the conversion rules select (stem, patterns, subclasses, skips: as ``convert`` decides)
may stay a convolution or become a GhostModule at any of the budget's ratios and cheap-kernel
sizes where that saves MACs; two ratios giving the same intrinsic channel count are one form.
Costs are counted exactly as fvcore counts them in ``ghostify.report``: a convolution costs
``batch x weight elements x output positions`` MACs per call (a GhostModule: its primary conv on
the intrinsic channels plus its depthwise cheap conv on every slot), and parameters are every
weight and bias of the layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from torch import nn

from ..options import intrinsic_count, no_ghost_reason
from ..surgery.discovery import ConvSite
from ..surgery.record import LayerSettings
from ..surgery.selection import savings_reason


@dataclass(frozen=True)
class Choice:
    """One form of a layer: the convolution as it is (``ratio`` None), or a GhostModule."""

    ratio: int | None = None
    dw_size: int | None = None

    @property
    def keep(self) -> bool:
        return self.ratio is None

    @property
    def settings(self) -> LayerSettings | None:
        return None if self.keep else LayerSettings(self.ratio, self.dw_size)  # type: ignore[arg-type]

    @property
    def label(self) -> str:
        return "conv" if self.keep else f"ghost r{self.ratio} dw{self.dw_size}"


KEEP = Choice()


@dataclass
class LayerOptions:
    """A layer the budget decides on: its forms and each form's exact costs (summed over the
    layer's calls), then its measured time and estimated loss per form."""

    name: str
    site: ConvSite
    choices: list[Choice]
    macs: list[int]
    params: list[int]
    ms: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)

    @property
    def module(self) -> nn.Module:
        return self.site.module


def layer_choices(
    conv: nn.Module, ratios: tuple[int, ...], dw_sizes: tuple[int, ...]
) -> list[Choice]:
    """``KEEP`` first, then every GhostModule form of ``conv`` that saves MACs, one per distinct
    (intrinsic channel count, dw_size)."""
    choices, seen = [KEEP], set()
    for ratio in sorted(ratios):
        if no_ghost_reason(conv.out_channels, ratio, conv.groups) is not None:
            continue
        intrinsic = intrinsic_count(conv.out_channels, ratio, conv.groups)
        for dw_size in sorted(dw_sizes):
            if (intrinsic, dw_size) in seen:
                continue
            if savings_reason(conv, LayerSettings(ratio, dw_size)) is None:
                seen.add((intrinsic, dw_size))
                choices.append(Choice(ratio, dw_size))
    return choices


def choice_macs(conv: nn.Module, choice: Choice, output_shapes: list[tuple[int, ...]]) -> int:
    """MACs of ``conv`` in form ``choice`` over calls giving ``output_shapes`` (fvcore's count)."""
    per_position = choice_weights(conv, choice, with_bias=False)
    return sum(shape[0] * math.prod(shape[2:]) * per_position for shape in output_shapes)


def choice_params(conv: nn.Module, choice: Choice) -> int:
    """Parameters of ``conv`` in form ``choice`` (fvcore's parameter_count)."""
    return choice_weights(conv, choice, with_bias=True)


def choice_weights(conv: nn.Module, choice: Choice, *, with_bias: bool) -> int:
    """Weight elements (and biases, ``with_bias``) of ``conv`` in form ``choice``."""
    filter_size = conv.in_channels // conv.groups * math.prod(conv.kernel_size)
    bias = with_bias and conv.bias is not None
    if choice.keep:
        return conv.out_channels * (filter_size + bias)
    intrinsic = intrinsic_count(conv.out_channels, choice.ratio, conv.groups)  # type: ignore[arg-type]
    slots = intrinsic * math.ceil((conv.out_channels - intrinsic) / intrinsic)
    cheap = choice.dw_size ** len(conv.kernel_size)  # type: ignore[operator]
    return intrinsic * (filter_size + bias) + slots * (cheap + bias)


def options_for(site: ConvSite, ratios: tuple[int, ...], dw_sizes: tuple[int, ...]) -> LayerOptions:
    """The budget's view of one selected layer: its forms and their MACs and parameters."""
    conv = site.module
    choices = layer_choices(conv, ratios, dw_sizes)
    return LayerOptions(
        name=site.name,
        site=site,
        choices=choices,
        macs=[choice_macs(conv, c, site.output_shapes) for c in choices],
        params=[choice_params(conv, c) for c in choices],
    )
