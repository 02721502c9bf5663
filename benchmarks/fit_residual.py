"""How well the data-free fit reproduces each converted layer's filters, measured from outside.

    python benchmarks/fit_residual.py [--model resnet50] [--ratio 2] [--dw-size 3]

For every convolution ``ghostify.convert`` would convert, a GhostModule is fitted with
``GhostModule.from_conv`` and both layers' *effective filters* are read off by autograd: the
gradient of one output pixel (away from the border) with respect to the input is the filter that
produced it, whatever the module does inside. The relative residual of a layer is
``sum_c |ghost_c - original_c|^2 / sum_c |original_c|^2`` over its output channels; the script
prints the mean over layers (and over ghost channels alone). It reads nothing of the fit's own
bookkeeping, so it can judge a change to the fit.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torchvision
from torch import nn

import ghostify
from ghostify import GhostModule


def window(conv: nn.Conv2d, dw_size: int) -> int:
    """Input size whose centre output pixel sees no padding, even through the cheap kernel."""
    reach = max(
        (k - 1) * d + 1 + (dw_size - 1) * s
        for k, s, d in zip(conv.kernel_size, conv.stride, conv.dilation, strict=True)
    )
    padding = 0 if isinstance(conv.padding, str) else max(conv.padding)
    return reach + 2 * (padding + max(conv.stride)) + 2


def effective_filters(
    module: nn.Module, conv: nn.Conv2d, size: int, chunk: int = 128
) -> torch.Tensor:
    """``(out, in, size, size)``: d output[c] at the centre pixel / d input, for each channel ``c``.

    Sample ``b`` of a batch asks for channel ``start + b``: one backward pass gives ``chunk``
    filters, since the samples of a batch do not mix.
    """
    rows = []
    for start in range(0, conv.out_channels, chunk):
        channels = torch.arange(start, min(start + chunk, conv.out_channels))
        x = torch.zeros(len(channels), conv.in_channels, size, size, requires_grad=True)
        out = module(x)
        centre = out[torch.arange(len(channels)), channels, out.shape[2] // 2, out.shape[3] // 2]
        (grad,) = torch.autograd.grad(centre.sum(), x)
        rows.append(grad)
    return torch.cat(rows)


def layer_residuals(conv: nn.Conv2d, ratio: int, dw_size: int) -> tuple[float, float]:
    """(relative residual over all channels, over the ghost channels alone) of one layer."""
    ghost = GhostModule.from_conv(conv, ratio=ratio, dw_size=dw_size)
    size = window(conv, dw_size)
    original = effective_filters(conv, conv, size).flatten(1)
    fitted = effective_filters(ghost, conv, size).flatten(1)
    error = (fitted - original).square().sum(dim=1)
    energy = original.square().sum(dim=1)
    is_ghost = ghost.output_position >= ghost.intrinsic_channels
    return float(error.sum() / energy.sum()), float(error[is_ghost].sum() / energy[is_ghost].sum())


def converted_convs(model: nn.Module, ratio: int, dw_size: int) -> list[str]:
    """Names of the convolutions ``convert`` converts with these settings (on a scratch copy)."""
    probe = ghostify.convert(model, ratio=ratio, dw_size=dw_size, init="scratch")
    return [row["name"] for row in ghostify.plan_of(probe)["layers"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50", help="a torchvision model name")
    parser.add_argument("--ratio", type=int, default=2)
    parser.add_argument("--dw-size", type=int, default=3)
    parser.add_argument("--verbose", action="store_true", help="print every layer")
    options = parser.parse_args()
    torch.manual_seed(0)
    model = getattr(torchvision.models, options.model)()
    names = converted_convs(
        getattr(torchvision.models, options.model)(), options.ratio, options.dw_size
    )
    whole, ghosts = [], []
    for name in names:
        conv = model.get_submodule(name)
        layer, ghost_only = layer_residuals(conv, options.ratio, options.dw_size)
        whole.append(layer)
        ghosts.append(ghost_only)
        if options.verbose:
            print(f"{name:28s} {layer:.6f} {ghost_only:.6f}")
    print(
        f"{options.model} ratio={options.ratio} dw_size={options.dw_size}: {len(names)} layers, "
        f"mean relative filter residual {statistics.mean(whole):.6f} "
        f"(ghost channels alone {statistics.mean(ghosts):.6f})"
    )


if __name__ == "__main__":
    main()
