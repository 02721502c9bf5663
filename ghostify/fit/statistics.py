"""Sufficient statistics for fitting a GhostModule on activations, accumulated batch by batch.

Like torch.ao's observers: run the data through, ``update`` after each batch, read the sums. No
activation is kept, so memory does not grow with the number of images, and every statistic is a
plain sum, so ranks of a distributed run all-reduce them (``tensors()``) and solve alike.

Two kinds:

- ``LayerStatistics`` (choosing the layout): every original channel is a candidate intrinsic
  channel, so the outputs of *all* original filters on the layer's inputs are the candidate
  sources. For each source it sums the Gram matrix of its ``dw_size``-patches (plus a constant),
  and their products with every target channel; optionally also the Gram matrix of the input
  patches, for refitting the intrinsic filters.
- ``KernelStatistics`` (refitting the cheap kernels of a fixed layout): the same sums for the
  GhostModule's own primary outputs and the targets of its slots only.

Targets are what the layer should output on those inputs: the original layer's output on the
*original* model's inputs in an asymmetric calibration, ``original(inputs)`` by default.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..layers.ghost_module import GhostModule

# Per-chunk budget for the patch tensors (floats): bigger batches are split, not refused.
_CHUNK_FLOATS = 2**24
# Above this many (source, target, tap) sums a layer's candidates would take too much memory.
MAX_PAIR_SUMS = 2**25


def _shifted(
    x: torch.Tensor,
    kernel: tuple[int, ...],
    dilation: tuple[int, ...],
    stride: tuple[int, ...],
) -> torch.Tensor:
    """Patches of an already padded ``x`` as ``(N, C, taps, L)`` (one strided view per tap),
    along its 1, 2 or 3 spatial dimensions.

    The same numbers as ``F.unfold`` (2-D only), which is an order of magnitude slower on CPU here.
    """
    n, c, *size = x.shape
    out = [
        (length - d * (k - 1) - 1) // s + 1
        for length, k, d, s in zip(size, kernel, dilation, stride, strict=True)
    ]

    def window(tap: tuple[int, ...]) -> tuple[slice, ...]:
        """Batch and channels whole, then every output position's input for this tap."""
        spatial = (
            slice(i * d, i * d + (o - 1) * s + 1, s)
            for i, d, o, s in zip(tap, dilation, out, stride, strict=True)
        )
        return (slice(None), slice(None), *spatial)

    taps = [x[window(tap)] for tap in itertools.product(*(range(k) for k in kernel))]
    return torch.stack(taps, dim=2).view(n, c, len(taps), math.prod(out))


def input_patches(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``conv``'s input patches ``(N, in_channels * taps, L)``, one column per output position.

    Padding (any mode, ``"same"`` included) is applied first exactly as ``conv`` does, so
    ``weight.flatten(1) @ patches`` per group is ``conv``'s output without bias.
    """
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str) or any(conv.padding):
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        x = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
    patches = _shifted(x, conv.kernel_size, conv.dilation, conv.stride)
    return patches.flatten(1, 2)


def tap_features(outputs: torch.Tensor, dw_size: int) -> torch.Tensor:
    """The cheap conv's view of ``outputs``: ``(N, C, dw_size**dims + 1, L)``, taps then a 1."""
    dims = outputs.dim() - 2
    radius = dw_size // 2
    padded = F.pad(outputs, (radius,) * (2 * dims))
    patches = _shifted(padded, (dw_size,) * dims, (1,) * dims, (1,) * dims)
    ones = patches.new_ones(*patches.shape[:2], 1, patches.shape[3])
    return torch.cat([patches, ones], dim=2)


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


class LayerStatistics:
    """Sums for choosing a layout on activations (see the module docstring).

    ``gram[s]``: Gram of source ``s``'s tap features ``(C, T, T)``; ``cross[s, t]``: their
    products with target ``t`` ``(C, C, T)``; ``target_sq[t]``: target energy. With
    ``refit_intrinsic``, also ``input_gram[g]`` (input patches of group ``g``, plus a constant)
    and ``input_cross[g]`` (their products with the group's targets).
    """

    def __init__(
        self, original: nn.Module, ghost: GhostModule, refit_intrinsic: bool = False
    ) -> None:
        self.original = original
        self.dw_size = ghost.dw_size
        self.dims = ghost.dims
        channels = original.out_channels
        taps = ghost.dw_size**ghost.dims + 1
        if channels * channels * taps > MAX_PAIR_SUMS:
            raise ConfigError(
                f"a layer with {channels} output channels is too wide to choose its layout on "
                f"activations ({channels}x{channels}x{taps} sums); fit it with "
                'choose="weights" instead'
            )
        factory = {"dtype": torch.float64, "device": original.weight.device}
        self.gram = torch.zeros(channels, taps, taps, **factory)
        self.cross = torch.zeros(channels, channels, taps, **factory)
        self.target_sq = torch.zeros(channels, **factory)
        self.count = torch.zeros((), **factory)
        self.refit_intrinsic = refit_intrinsic
        if refit_intrinsic:
            groups = original.groups
            size = original.weight[0].numel() + 1
            self.input_gram = torch.zeros(groups, size, size, **factory)
            self.input_cross = torch.zeros(groups, size, channels // groups, **factory)

    def tensors(self) -> list[torch.Tensor]:
        """Every sum, for an all-reduce across ranks."""
        sums = [self.gram, self.cross, self.target_sq, self.count]
        if self.refit_intrinsic:
            sums += [self.input_gram, self.input_cross]
        return sums

    @torch.no_grad()
    def update(self, inputs: torch.Tensor, targets: torch.Tensor | None = None) -> None:
        """Add one batch of the layer's inputs and (default ``original(inputs)``) its targets."""
        conv = self.original
        check_pair(inputs, targets, conv.in_channels, conv.out_channels, self.dims)
        sources = conv(inputs)
        targets = sources if targets is None else targets
        if targets.shape != sources.shape:
            raise ConfigError(
                f"targets have shape {tuple(targets.shape)}, the layer gives "
                f"{tuple(sources.shape)} on these inputs"
            )
        per_image = sources[0].numel() * (self.dw_size**self.dims + 1)
        step = max(1, _CHUNK_FLOATS // per_image)
        for start in range(0, inputs.shape[0], step):
            part = slice(start, start + step)
            self._add(inputs[part], sources[part], targets[part])

    def _add(self, inputs: torch.Tensor, sources: torch.Tensor, targets: torch.Tensor) -> None:
        features = tap_features(sources.float(), self.dw_size)
        flat_targets = targets.float().flatten(2)
        self.gram += torch.einsum("nctl,ncul->ctu", features, features).double()
        self.cross += torch.einsum("nctl,ndl->cdt", features, flat_targets).double()
        self.target_sq += flat_targets.double().square().sum(dim=(0, 2))
        self.count += flat_targets.shape[0] * flat_targets.shape[2]
        if self.refit_intrinsic:
            conv = self.original
            groups = conv.groups
            patches = input_patches(conv, inputs.float())
            n, _, positions = patches.shape
            patches = patches.view(n, groups, -1, positions)
            patches = torch.cat([patches, patches.new_ones(n, groups, 1, positions)], dim=2)
            grouped = flat_targets.view(n, groups, -1, positions)
            self.input_gram += torch.einsum("ngdl,ngel->gde", patches, patches).double()
            self.input_cross += torch.einsum("ngdl,ngcl->gdc", patches, grouped).double()


class KernelStatistics:
    """Sums for refitting the cheap kernels of ``ghost``'s current layout on activations.

    ``gram[i]``: Gram of intrinsic channel ``i``'s tap features (module order) ``(m, T, T)``;
    ``cross[j]``: products of slot ``j``'s source features with its target ``(ghosts, T)``.
    """

    def __init__(self, original: nn.Module, ghost: GhostModule) -> None:
        self.original = original
        self.ghost = ghost
        factory = {"dtype": torch.float64, "device": original.weight.device}
        taps = ghost.dw_size**ghost.dims + 1
        self.gram = torch.zeros(ghost.intrinsic_channels, taps, taps, **factory)
        self.cross = torch.zeros(ghost.ghost_channels, taps, **factory)
        self.count = torch.zeros((), **factory)

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
        m = ghost.intrinsic_channels
        position = ghost.output_position.to(inputs.device)
        channel_at = torch.empty_like(position)
        channel_at[position] = torch.arange(ghost.out_channels, device=position.device)
        source = ghost.slot_source.to(inputs.device)
        intrinsic = ghost.primary_conv(inputs)
        per_image = intrinsic[0].numel() * (ghost.dw_size**ghost.dims + 1)
        step = max(1, _CHUNK_FLOATS // per_image)
        for start in range(0, inputs.shape[0], step):
            part = slice(start, start + step)
            features = tap_features(intrinsic[part].float(), ghost.dw_size)
            target = targets[part][:, channel_at[m:]].float().flatten(2)  # slot order
            self.gram += torch.einsum("nmtl,nmul->mtu", features, features).double()
            self.cross += torch.einsum("nstl,nsl->st", features[:, source], target).double()
            self.count += target.shape[0] * target.shape[2]
