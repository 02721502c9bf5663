"""Coupled channel groups: the layers whose channels must all live in one order.

Channels meet where two tensors are combined element by element: a residual add, an FPN merge,
an SE gate's multiply. Every layer writing into such a meeting, every per-channel layer on the
way (BatchNorm, activations, pooling, depthwise convolutions) and every layer reading from it
must agree on one channel order, so they form one group, found once from the kept fx graph (as
Torch-Pruning's dependency graph groups coupled channels for pruning). A convolution or a linear
layer reads a group on its input side and starts a new group on its output. A concatenation
does not couple its inputs: a layer reading it reads each input's group at an offset (DenseNet).
Anything else (a reshape, the model's output, an op not known here, an input of the model)
pins the group: its channels must stay in the original order there. The graph walk itself is
``channel_walk``; here its united channel spaces become the groups.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field

from torch import nn

from ..layers.conv_types import TORCH_CONVS
from .channel_walk import ChannelWalk, is_depthwise
from .graph import TracedGraph


@dataclass(frozen=True)
class Use:
    """A module touching a group's channels: where they start along its channel axis."""

    module: str  # qualified name
    offset: int = 0


@dataclass
class ChannelGroup:
    """One set of coupled channels: everything that must agree on their order.

    ``writers`` make the channels (convolutions and linear layers, by their output rows);
    ``through`` keep them apart channel by channel (BatchNorm, PReLU, depthwise convolutions:
    their per-channel tensors); ``readers`` take them in (convolutions and linear layers, by
    their input columns), each at an offset when it reads a concatenation. ``pins`` say why the
    order cannot change (empty when the group may take any order).
    """

    index: int
    channels: int | None
    writers: list[str] = field(default_factory=list)
    through: list[Use] = field(default_factory=list)
    readers: list[Use] = field(default_factory=list)
    pins: list[str] = field(default_factory=list)
    # Writers of one value per sample and channel (an SE gate after a global pool): their own
    # order costs next to nothing to gather, so they never decide the group's order.
    pooled: list[str] = field(default_factory=list)

    @property
    def free(self) -> bool:
        """Whether the group's order may change (nothing pins it)."""
        return not self.pins


@dataclass
class Coupling:
    """The channel groups of a model, and which group each layer writes."""

    groups: list[ChannelGroup]

    def group_of(self, writer: str) -> ChannelGroup | None:
        """The group ``writer`` writes into, or None when it is outside every traced graph."""
        return next((g for g in self.groups if writer in g.writers), None)


def find_groups(
    model: nn.Module, graphs: Iterable[TracedGraph], converted: Iterable[str] = ()
) -> Coupling:
    """The coupled channel groups of ``model``'s traced ``graphs`` (see the module docstring).

    ``converted`` names the convolutions that become GhostModules: their output rows can take
    any order, where a plain grouped or unknown convolution's cannot.
    """
    walk = ChannelWalk()
    for traced in graphs:
        walk.graph(traced)
    return Coupling(_groups(walk, model, frozenset(converted)))


def _groups(walk: ChannelWalk, model: nn.Module, converted: frozenset[str]) -> list[ChannelGroup]:
    """The walk's united spaces as channel groups, in graph order, with every pin."""
    spaces = walk.spaces
    for (name, role), axis in walk.axes.items():
        if role == "out" and not _rows_movable(model, converted, name):
            spaces.pin(axis[0], f"written by {name!r}, whose output rows cannot be reordered")
        if any(
            f"{name}.".startswith(f"{read}.") or read.startswith(f"{name}.")
            for read in walk.read_directly
        ):
            for space in axis:
                spaces.pin(space, f"{name!r} has tensors the model reads directly")
    found: dict[int, ChannelGroup] = {}
    for (name, role), axis in sorted(walk.axes.items(), key=lambda item: min(item[1])):
        sizes = [spaces.size[spaces.find(space)] for space in axis]
        if None in sizes or not _axis_fits(model, name, role, sum(sizes)):
            for space in axis:
                spaces.pin(space, f"the channels {name!r} sees could not be counted")
            continue
        offsets = [0, *itertools.accumulate(sizes)][:-1]
        for space, offset in zip(axis, offsets, strict=True):
            root = spaces.find(space)
            group = found.setdefault(root, ChannelGroup(len(found), spaces.size[root]))
            if role == "out":
                group.writers.append(name)
                if name in walk.pooled:
                    group.pooled.append(name)
            elif role == "through":
                group.through.append(Use(name, offset))
            else:
                group.readers.append(Use(name, offset))
    groups = [group for group in found.values() if group.writers]
    for root, group in found.items():
        group.pins = list(spaces.pins[root])
    for index, group in enumerate(groups):
        group.index = index
    return groups


def _rows_movable(model: nn.Module, converted: frozenset[str], name: str) -> bool:
    """Whether a writer's output rows can take any order: a layer being converted (its
    GhostModule's order is set), torch's own Linear and ungrouped convolutions (permuted).
    A GhostModule from an earlier conversion is left as it is."""
    if name in converted:
        return True
    module = model.get_submodule(name)
    if type(module) is nn.Linear:
        return True
    return type(module) in TORCH_CONVS and module.groups == 1


def _axis_fits(model: nn.Module, name: str, role: str, channels: int) -> bool:
    module = model.get_submodule(name)
    if isinstance(module, nn.Linear):
        return channels == (module.out_features if role == "out" else module.in_features)
    if isinstance(module, nn.modules.batchnorm._NormBase):
        return channels == module.num_features
    if isinstance(module, nn.PReLU):
        return channels == module.num_parameters
    if role == "in":
        return channels == module.in_channels
    if role == "out" or is_depthwise(module):
        return channels == module.out_channels
    return channels == len(module.weight)  # a frozen BatchNorm
