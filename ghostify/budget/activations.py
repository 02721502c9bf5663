"""Sums of what each candidate layer sees on the calibration data, for its per-form losses.

One pass of the original model over the data (more only when the sums would not fit
``memory_bytes`` at once), with a forward hook on every candidate layer. At a random sample of
output positions (``positions`` per layer in all, spread evenly over the images) each hook adds
to the layer's sums, the ones ``fit.statistics.LayerStatistics`` keeps for choosing a layout:
the Gram matrix of each output channel's cheap-kernel taps (and a constant), their products
with every output channel, each channel's energy. Sampled positions make a wide layer's sums
cost ``positions x channels^2 x taps`` multiply-adds, not that times every pixel of every image;
the relative errors read off them are estimates of the full data's.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..inputs import eval_mode
from ..surgery.discovery import ConvSite

DEFAULT_POSITIONS = 8192
DEFAULT_MEMORY_BYTES = 2**30


class ActivationSums:
    """``gram (C, T, T)``, ``cross (C, C, T)``, ``target_sq (C,)`` in float64, as
    ``LayerStatistics`` names them (``T``: the cheap kernel's taps and a constant)."""

    def __init__(self, channels: int, dims: int, dw_size: int, device: torch.device) -> None:
        taps = dw_size**dims + 1
        factory = {"dtype": torch.float64, "device": device}
        self.dims, self.dw_size = dims, dw_size
        self.gram = torch.zeros(channels, taps, taps, **factory)
        self.cross = torch.zeros(channels, channels, taps, **factory)
        self.target_sq = torch.zeros(channels, **factory)
        self.count = 0

    @staticmethod
    def nbytes(channels: int, dims: int, dw_size: int) -> int:
        taps = dw_size**dims + 1
        return 8 * channels * taps * (channels + taps + 1)

    def add(self, output: torch.Tensor, samples: int, generator: torch.Generator) -> None:
        """Add ``samples`` random positions of each image of ``output`` (a layer's output)."""
        batch, channels, *spatial = output.shape
        size = math.prod(spatial)
        picks = min(samples, size)
        flat = torch.rand(batch, size, generator=generator).argsort(dim=1)[:, :picks]
        image = torch.arange(batch).repeat_interleave(picks)
        where = [index.flatten() for index in torch.unravel_index(flat, spatial)]
        radius = self.dw_size // 2
        padded = F.pad(output.float(), (radius,) * (2 * self.dims)).cpu()
        taps = []
        for shift in itertools.product(range(self.dw_size), repeat=self.dims):
            coords = [w + s for w, s in zip(where, shift, strict=True)]
            taps.append(padded[(image, slice(None), *coords)])  # (S, C)
        taps.append(torch.ones_like(taps[0]))
        features = torch.stack(taps, dim=2).double()  # (S, C, T)
        centre = [w + radius for w in where]
        targets = padded[(image, slice(None), *centre)].double()  # (S, C)
        device = self.gram.device
        features, targets = features.to(device), targets.to(device)
        self.gram += torch.einsum("sct,scu->ctu", features, features)
        # cross[c, d, t] = sum_s features[s, c, t] targets[s, d]: one matrix product.
        flat_features = features.reshape(features.shape[0], -1)  # (S, C*T)
        product = flat_features.T @ targets  # (C*T, C)
        self.cross += product.view(channels, -1, channels).permute(0, 2, 1)
        self.target_sq += targets.square().sum(dim=0)
        self.count += targets.shape[0]


@torch.no_grad()
def collect_sums(
    model: nn.Module,
    sites: Sequence[ConvSite],
    inputs: Iterable[torch.Tensor],
    images: int,
    dw_size: int,
    *,
    positions: int = DEFAULT_POSITIONS,
    memory_bytes: int = DEFAULT_MEMORY_BYTES,
    seed: int = 0,
) -> dict[str, ActivationSums]:
    """The sums of every site's output over ``inputs`` (``images`` of them in all), in as few
    passes of ``model`` as ``memory_bytes`` allows (a layer over it gets a pass of its own)."""
    per_image = max(1, math.ceil(positions / max(1, images)))
    passes: list[list[ConvSite]] = [[]]
    used = 0
    for site in sites:
        need = ActivationSums.nbytes(site.module.out_channels, _dims(site), dw_size)
        if passes[-1] and used + need > memory_bytes:
            passes.append([])
            used = 0
        passes[-1].append(site)
        used += need
    sums: dict[str, ActivationSums] = {}
    for group in passes:
        sums.update(_one_pass(model, group, inputs, dw_size, per_image, seed))
    return sums


def _dims(site: ConvSite) -> int:
    return len(site.module.kernel_size)


def _one_pass(
    model: nn.Module,
    sites: Sequence[ConvSite],
    inputs: Iterable[torch.Tensor],
    dw_size: int,
    per_image: int,
    seed: int,
) -> dict[str, ActivationSums]:
    device = next(model.parameters()).device
    sums = {s.name: ActivationSums(s.module.out_channels, _dims(s), dw_size, device) for s in sites}
    generator = torch.Generator().manual_seed(seed)

    def hook(name: str):
        def add(_module: nn.Module, _args: object, output: torch.Tensor) -> None:
            sums[name].add(output.detach(), per_image, generator)

        return add

    handles = [s.module.register_forward_hook(hook(s.name)) for s in sites]
    try:
        with eval_mode(model):
            for batch in inputs:
                model(batch)
    finally:
        for handle in handles:
            handle.remove()
    return sums
