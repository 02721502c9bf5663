"""Sufficient statistics for fitting a GhostModule on activations, accumulated batch by batch.

Like torch.ao's observers: run the data through, ``update`` after each batch, read the sums. No
activation is kept, so memory does not grow with the number of images, and every statistic is a
plain sum, so ranks of a distributed run all-reduce them (``tensors()``) and solve alike.

Three kinds:

- ``LayerStatistics`` (choosing the layout): every original channel is a candidate intrinsic
  channel, so the outputs of *all* original filters on the layer's inputs are the candidate
  sources. For each source it sums the Gram matrix of its ``dw_size``-patches (plus a constant),
  and their products with every target channel; optionally (``InputStatistics``) also the Gram
  matrix of the input patches, for refitting the intrinsic filters.
- ``InputStatistics``: the input-patch Gram matrix and its products with the targets alone.
- ``KernelStatistics`` (refitting the cheap kernels of a fixed layout): the same sums for the
  GhostModule's own primary outputs and the targets of its slots only.

Targets are what the layer should output on those inputs: the original layer's output on the
*original* model's inputs in an asymmetric calibration, ``original(inputs)`` by default.

Every sum is one BLAS product per block of samples (``bmm``/``mm`` on contiguous columns,
``ghostify.fit.patches``), computed in float64: the cheap-kernel and ridge systems solved from
these sums are ill-conditioned (neighbouring taps of a smooth map, and the constant, are nearly
collinear), and float32 block sums made the fitted weights depend on how the data was split
into batches and ranks by up to 3e-5 (docs/guides/calibration.md). ``Sampling`` subsamples the
output positions (the same ones in every sample) where there are far more than unknowns.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from ..layers.ghost_module import GhostModule
from .patches import (
    TapSampler,
    as_columns,
    conv_patches,
    input_patches,
    position_columns,
    sample_positions,
)

__all__ = [
    "MAX_PAIR_SUMS",
    "WORKSPACE_BYTES",
    "InputStatistics",
    "KernelStatistics",
    "LayerStatistics",
    "Sampling",
    "check_pair",
    "input_patches",
]

# Per-chunk budget for the gathered columns (float64 values): bigger batches are split.
_CHUNK_FLOATS = 2**23
# Transient bytes of one update: the gathered columns and their float64 copies, at most.
WORKSPACE_BYTES = 3 * 8 * _CHUNK_FLOATS
# Above this many (source, target, tap) sums a layer's candidates would take too much memory.
MAX_PAIR_SUMS = 2**25


@dataclass(frozen=True)
class Sampling:
    """Output positions per sample that feed the sums (None: all of them).

    ``layout``: for the layout sums (``gram``, ``cross``, ``target_sq``); ``inputs``: for the
    input-patch Gram. The positions are drawn once per layer and map size from ``seed``, the
    same for every sample, so the sums do not depend on batching or on the ranks' shards.
    """

    layout: int | None = None
    inputs: int | None = None
    seed: int = 0


def _spatial(dims: int) -> str:
    return {1: "L", 2: "H, W", 3: "D, H, W"}[dims]


def check_pair(
    inputs: object, targets: object, in_channels: int, out_channels: int, dims: int = 2
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Raise a ConfigError unless ``inputs`` (and ``targets``) are a ``dims``-D layer's input and
    output."""
    spatial = _spatial(dims)
    if (
        not isinstance(inputs, torch.Tensor)
        or inputs.dim() != dims + 2
        or inputs.shape[1] != in_channels
    ):
        got = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__
        raise ConfigError(
            f"activations must be (N, {in_channels}, {spatial}) inputs of the layer; got {got}"
        )
    if targets is not None and (
        not isinstance(targets, torch.Tensor)
        or targets.dim() != dims + 2
        or targets.shape[:2] != (inputs.shape[0], out_channels)
    ):
        got = tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__
        raise ConfigError(
            f"targets must be ({inputs.shape[0]}, {out_channels}, {spatial}) outputs of the layer "
            f"for those inputs; got {got}"
        )
    return inputs, targets


def _chunks(n: int, floats_per_sample: int) -> list[slice]:
    step = max(1, _CHUNK_FLOATS // max(1, floats_per_sample))
    return [slice(start, start + step) for start in range(0, n, step)]


class _Positions:
    """The sampled positions of one layer, per map size (drawn once each)."""

    def __init__(self, per_sample: int | None, seed: int) -> None:
        self.per_sample = per_sample
        self.seed = seed
        self._drawn: dict[int, torch.Tensor | None] = {}
        self._samplers: dict[tuple[tuple[int, ...], int], TapSampler] = {}

    def __call__(self, length: int) -> torch.Tensor | None:
        if length not in self._drawn:
            self._drawn[length] = sample_positions(length, self.per_sample, self.seed + length)
        return self._drawn[length]

    def count(self, length: int) -> int:
        return length if self.per_sample is None else min(length, self.per_sample)

    def sampler(self, grid: tuple[int, ...], dw_size: int) -> TapSampler:
        """The tap reader for a map of ``grid`` (built once per grid)."""
        key = (grid, dw_size)
        if key not in self._samplers:
            self._samplers[key] = TapSampler(grid, dw_size, self(math.prod(grid)))
        return self._samplers[key]


# Above this many features a Gram matrix is built from its upper blocks only (its lower ones are
# their transposes): 56-62% of the products, the costliest sum of the exact refit.
_SYMMETRIC_BLOCK = 512


def _add_gram(gram: torch.Tensor, features: torch.Tensor) -> None:
    """``gram += features @ features.T`` per leading index, ``features`` (B, F, M)."""
    size = features.shape[1]
    if size < 2 * _SYMMETRIC_BLOCK:
        gram += torch.bmm(features, features.transpose(1, 2))
        return
    blocks = list(itertools.pairwise([*range(0, size, _SYMMETRIC_BLOCK), size]))
    for i, (a, b) in enumerate(blocks):
        for c, d in blocks[i:]:
            block = torch.bmm(features[:, a:b], features[:, c:d].transpose(1, 2))
            gram[:, a:b, c:d] += block
            if c != a:
                gram[:, c:d, a:b] += block.transpose(1, 2)


def _add_tap_gram(gram: torch.Tensor, features: torch.Tensor) -> None:
    """Add the Gram matrices of ``features`` (B, F, M) with a constant appended as a last
    feature, without copying the features to append it."""
    taps, count = features.shape[1], features.shape[2]
    _add_gram(gram[:, :taps, :taps], features)
    sums = features.sum(dim=2)
    gram[:, :taps, taps] += sums
    gram[:, taps, :taps] += sums
    gram[:, taps, taps] += count


class InputStatistics:
    """Sums for refitting the filters of ``original``: ``gram[g]`` of group ``g``'s input
    patches plus a constant ``(K + 1, K + 1)``, ``cross[g]`` their products with the group's
    targets ``(K + 1, out / groups)``, ``target_sq`` per output channel, ``count`` positions."""

    def __init__(self, original: nn.Module, per_sample: int | None = None, seed: int = 0) -> None:
        self.original = original
        groups, channels = original.groups, original.out_channels
        size = original.weight[0].numel() + 1
        factory = {"dtype": torch.float64, "device": original.weight.device}
        self.gram = torch.zeros(groups, size, size, **factory)
        self.cross = torch.zeros(groups, size, channels // groups, **factory)
        self.target_sq = torch.zeros(channels, **factory)
        self.count = torch.zeros((), **factory)
        self.positions = _Positions(per_sample, seed)

    @staticmethod
    def nbytes(original: nn.Module) -> int:
        """Bytes of the sums for ``original`` (float64)."""
        size = original.weight[0].numel() + 1
        return 8 * original.groups * size * (size + original.out_channels // original.groups)

    def tensors(self) -> list[torch.Tensor]:
        return [self.gram, self.cross, self.target_sq, self.count]

    @torch.no_grad()
    def update(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        conv = self.original
        groups = conv.groups
        length = targets[0, 0].numel()
        positions = self.positions(length)
        per_sample = conv.weight[0].numel() * groups * self.positions.count(length)
        for part in _chunks(inputs.shape[0], 3 * per_sample):
            columns = as_columns(conv_patches(conv, inputs[part], positions))
            patches = columns.view(groups, -1, columns.shape[2])  # (groups, K, M)
            wanted = position_columns(targets[part], positions)
            wanted = wanted.view(groups, -1, wanted.shape[1])
            _add_tap_gram(self.gram, patches)  # the constant appended as in the tap sums
            size = patches.shape[1]
            self.cross[:, :size] += torch.bmm(patches, wanted.transpose(1, 2))
            self.cross[:, size] += wanted.sum(dim=2)
            self.target_sq += wanted.square().sum(dim=2).flatten()
            self.count += wanted.shape[2]


class LayerStatistics:
    """Sums for choosing a layout on activations (see the module docstring).

    ``gram[s]``: Gram of source ``s``'s tap features ``(C, T, T)`` (features: the ``dw_size**dims``
    taps in kernel order, then a constant; with ``dw_size=3`` the centre tap alone is the
    ``dw_size=1`` case); ``cross[s, :, t]``: their products with target ``t`` ``(C, T, C)``;
    ``target_sq[t]``: target energy; ``count``: positions summed. With ``refit_intrinsic``,
    also ``inputs`` (``InputStatistics``: ``input_gram``, ``input_cross``). Pass ``ghost`` or
    ``dw_size``.
    """

    def __init__(
        self,
        original: nn.Module,
        ghost: GhostModule | None = None,
        refit_intrinsic: bool = False,
        *,
        dw_size: int | None = None,
        sampling: Sampling | None = None,
    ) -> None:
        if ghost is None and dw_size is None:
            raise ConfigError("LayerStatistics needs the ghost layer or its dw_size")
        self.original = original
        self.dw_size = ghost.dw_size if ghost is not None else int(dw_size)  # type: ignore[arg-type]
        self.dims = original.weight.dim() - 2
        channels = original.out_channels
        taps = self.dw_size**self.dims + 1
        if channels * channels * taps > MAX_PAIR_SUMS:
            raise ConfigError(
                f"a layer with {channels} output channels is too wide to choose its layout on "
                f"activations ({channels}x{channels}x{taps} sums); fit it with "
                'choose="weights" instead'
            )
        sampling = sampling or Sampling()
        factory = {"dtype": torch.float64, "device": original.weight.device}
        self.gram = torch.zeros(channels, taps, taps, **factory)
        # The taps' products with the targets and the targets' sums (the constant feature's
        # products, the same for every source): ``cross`` puts them together when read.
        self.tap_cross = torch.zeros(channels, taps - 1, channels, **factory)
        self.target_sum = torch.zeros(channels, **factory)
        self.target_sq = torch.zeros(channels, **factory)
        self.count = torch.zeros((), **factory)
        self.positions = _Positions(sampling.layout, sampling.seed)
        self.refit_intrinsic = refit_intrinsic
        self.inputs = (
            InputStatistics(original, sampling.inputs, sampling.seed + 1)
            if (refit_intrinsic)
            else None
        )

    @staticmethod
    def nbytes(original: nn.Module, dw_size: int, refit_intrinsic: bool = False) -> int:
        """Bytes of the sums (float64)."""
        channels = original.out_channels
        taps = dw_size ** (original.weight.dim() - 2) + 1
        own = 8 * channels * taps * (taps + channels + 1)
        return own + (InputStatistics.nbytes(original) if refit_intrinsic else 0)

    @property
    def cross(self) -> torch.Tensor:
        """Products of every source's tap features with every target ``(C, T, C)``."""
        constant = self.target_sum.expand(self.tap_cross.shape[0], 1, -1)
        return torch.cat([self.tap_cross, constant], dim=1)

    @property
    def input_gram(self) -> torch.Tensor:
        assert self.inputs is not None, "LayerStatistics(..., refit_intrinsic=True) has it"
        return self.inputs.gram

    @property
    def input_cross(self) -> torch.Tensor:
        assert self.inputs is not None, "LayerStatistics(..., refit_intrinsic=True) has it"
        return self.inputs.cross

    def tensors(self) -> list[torch.Tensor]:
        """Every sum, for an all-reduce across ranks."""
        sums = [self.gram, self.tap_cross, self.target_sum, self.target_sq, self.count]
        return sums + (self.inputs.tensors() if self.inputs is not None else [])

    @torch.no_grad()
    def update(self, inputs: torch.Tensor, targets: torch.Tensor | None = None) -> None:
        """Add one batch of the layer's inputs and (default ``original(inputs)``) its targets.

        The candidate sources (every original filter's output) are computed only where the
        sampled positions' taps read them.
        """
        conv = self.original
        check_pair(inputs, targets, conv.in_channels, conv.out_channels, self.dims)
        if targets is None:
            targets = conv(inputs)
            self.add_sources(targets, targets)
        else:
            sampler = self.positions.sampler(tuple(targets.shape[2:]), self.dw_size)
            self._add(sampler, sampler.outputs(conv, inputs, _CHUNK_FLOATS), targets)
        if self.inputs is not None:
            self.inputs.update(inputs, targets)

    def add_sources(self, sources: torch.Tensor, targets: torch.Tensor) -> None:
        """Add the layout sums of one batch whose candidate sources are already computed."""
        if sources.shape != targets.shape:
            raise ConfigError(
                f"targets have shape {tuple(targets.shape)}, the layer gives "
                f"{tuple(sources.shape)} on these inputs"
            )
        self._add(self.positions.sampler(tuple(targets.shape[2:]), self.dw_size), sources, targets)

    def _add(self, sampler: TapSampler, values: torch.Tensor, targets: torch.Tensor) -> None:
        """Add the sums of one batch: ``values`` are what ``sampler`` reads the taps from."""
        positions = self.positions(targets[0, 0].numel())
        channels, taps = targets.shape[1], self.gram.shape[-1]
        per_sample = channels * (taps + 1) * self.positions.count(targets[0, 0].numel())
        for part in _chunks(targets.shape[0], 2 * per_sample):
            features = sampler.columns(values[part])  # (C, taps - 1, M)
            wanted = position_columns(targets[part], positions)  # (C, M)
            _add_tap_gram(self.gram, features)
            self.tap_cross.view(-1, channels).addmm_(features.view(-1, features.shape[2]), wanted.T)
            self.target_sum += wanted.sum(dim=1)
            self.target_sq += wanted.square().sum(dim=1)
            self.count += wanted.shape[1]


class KernelStatistics:
    """Sums for refitting the cheap kernels of ``ghost``'s current layout on activations.

    ``gram[i]``: Gram of intrinsic channel ``i``'s tap features (module order) ``(m, T, T)``;
    ``cross[j]``: products of slot ``j``'s source features with its target ``(ghosts, T)``.
    ``sampling.layout`` positions per sample (None: all).
    """

    def __init__(
        self, original: nn.Module, ghost: GhostModule, sampling: Sampling | None = None
    ) -> None:
        self.original = original
        self.ghost = ghost
        factory = {"dtype": torch.float64, "device": original.weight.device}
        taps = ghost.dw_size**ghost.dims + 1
        self.gram = torch.zeros(ghost.intrinsic_channels, taps, taps, **factory)
        self.cross = torch.zeros(ghost.ghost_channels, taps, **factory)
        self.count = torch.zeros((), **factory)
        sampling = sampling or Sampling()
        self.positions = _Positions(sampling.layout, sampling.seed + 2)

    def tensors(self) -> list[torch.Tensor]:
        """Every sum, for an all-reduce across ranks."""
        return [self.gram, self.cross, self.count]

    @torch.no_grad()
    def update(self, inputs: torch.Tensor, targets: torch.Tensor | None = None) -> None:
        """Add one batch of the layer's inputs and (default ``original(inputs)``) its targets."""
        ghost = self.ghost
        check_pair(inputs, targets, ghost.in_channels, ghost.out_channels, ghost.dims)
        if targets is None:
            targets = self.original(inputs)
        m, slots = ghost.intrinsic_channels, ghost.ghost_channels
        per_source = ghost.multiplier
        position = ghost.output_position.to(targets.device)
        channel_at = torch.empty_like(position)
        channel_at[position] = torch.arange(ghost.out_channels, device=position.device)
        length = targets[0, 0].numel()
        positions = self.positions(length)
        taps = self.gram.shape[-1]
        sampler = self.positions.sampler(tuple(targets.shape[2:]), ghost.dw_size)
        intrinsic = sampler.outputs(ghost.primary_conv, inputs, _CHUNK_FLOATS)
        per_sample = m * (taps + per_source) * self.positions.count(length)
        for part in _chunks(inputs.shape[0], 2 * per_sample):
            features = sampler.columns(intrinsic[part])  # (m, taps - 1, M)
            slot_targets = targets[part].index_select(1, channel_at[m:])  # slot order
            wanted = position_columns(slot_targets, positions)
            if m * per_source > slots:  # surplus slots read nothing
                missing = wanted.new_zeros(m * per_source - slots, wanted.shape[1])
                wanted = torch.cat([wanted, missing])
            by_source = wanted.view(m, per_source, -1)  # (m, per_source, M)
            _add_tap_gram(self.gram, features)
            products = torch.bmm(by_source, features.transpose(1, 2))  # (m, per_source, taps-1)
            self.cross[:, : taps - 1] += products.reshape(m * per_source, taps - 1)[:slots]
            self.cross[:, taps - 1] += by_source.sum(dim=2).reshape(-1)[:slots]
            self.count += wanted.shape[1]
