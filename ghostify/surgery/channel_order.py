"""Channel order at model level: one order per channel group, absorbed once by its layers.

A fitted GhostModule computes the original layer's channels in its own order (kept filters
first, then the ghosts by slot). Every layer of its channel group (``coupling``) can be
permuted once, at conversion, to work in that order instead: the plain writers' output rows,
the per-channel layers' tensors (BatchNorm, PReLU, depthwise convolutions) and the readers'
input columns. The GhostModules whose order the group takes then drop their gather. Writers of
the group with another order (their own layouts: see ``ghostify.fit.shared``) gather into the
group's order; a pinned group keeps the original order, and each GhostModule writing into it
gathers back to it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from ..layers.conv_types import TORCH_CONVS
from ..layers.ghost_module import GhostModule
from .channel_values import THROUGH_TENSORS
from .coupling import ChannelGroup, Coupling
from .record import Permutation
from .swap import Transaction

# A layer's channel order after folding (see ``ConvertedLayer.channel_order``).
FOLDED, GATHERED, KEPT, IDENTITY = "folded", "gathered", "kept", "identity"


@dataclass
class LayerOrder:
    """What became of one GhostModule's channel order."""

    state: str  # FOLDED, GATHERED, KEPT or IDENTITY
    # The original channel at each output position, when that is not the original order.
    output_order: tuple[int, ...] | None = None
    permutations: list[Permutation] = field(default_factory=list)


@dataclass
class _Edit:
    """One tensor of the model reordered along ``dim``; ``index`` starts as the identity."""

    module: str
    tensor: torch.Tensor
    attribute: str
    dim: int
    index: torch.Tensor


class _Edits:
    """The permutations of every group, gathered per tensor (a concatenation's reader holds
    several groups' channels along one axis)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.edits: dict[tuple[str, str, int], _Edit] = {}

    def add(
        self, module: str, owner: nn.Module, attribute: str, dim: int, offset: int, at: torch.Tensor
    ) -> tuple[str, str, int] | None:
        tensor = getattr(owner, attribute, None)
        if not isinstance(tensor, torch.Tensor):
            return None
        key = (module, attribute, dim)
        if key not in self.edits:
            index = torch.arange(tensor.shape[dim])
            self.edits[key] = _Edit(module, tensor, attribute, dim, index)
        self.edits[key].index[offset : offset + len(at)] = at + offset
        return key


def fold_channel_orders(
    model: nn.Module, layers: dict[str, GhostModule], coupling: Coupling, changes: Transaction
) -> dict[str, LayerOrder]:
    """Give every free channel group the order of its GhostModule writers (the order most of
    them share), permuting the group's other layers once; returns each of ``layers``' order
    (all changes recorded in ``changes``, so a rollback undoes them)."""
    edits = _Edits(model)
    touched: dict[int, set[tuple[str, str, int]]] = {}
    orders: dict[str, LayerOrder] = {}
    for group in coupling.groups:
        order = _group_order(group, layers)
        if order is None:
            continue
        channel_at = torch.empty_like(order)
        channel_at[order] = torch.arange(len(order))
        touched[group.index] = _plan_group(group, layers, channel_at, edits)
        output_order = tuple(channel_at.tolist())
        for name in group.writers:
            ghost = layers.get(name)
            if ghost is None:
                continue
            own = ghost.output_position  # the module position of each original channel
            changes.on_rollback(lambda g=ghost, o=ghost.channel_order: g.set_channel_order(o))
            ghost.set_channel_order(own[channel_at])
            state = FOLDED if ghost.channel_order is None else GATHERED
            orders[name] = LayerOrder(state, output_order)
    permutations = {
        key: Permutation(edit.module, edit.attribute, edit.dim, tuple(edit.index.tolist()))
        for key, edit in edits.edits.items()
    }
    for group in coupling.groups:
        for name in group.writers:
            if name in orders and group.index in touched:
                orders[name].permutations = [permutations[key] for key in touched[group.index]]
    changes.permute_all([(edit.tensor, edit.dim, edit.index) for edit in edits.edits.values()])
    for name, ghost in layers.items():
        if name not in orders:
            orders[name] = LayerOrder(KEPT if ghost.channel_order is not None else IDENTITY)
    return orders


def _group_order(group: ChannelGroup, layers: dict[str, GhostModule]) -> torch.Tensor | None:
    """The order a free group takes: its GhostModule writers' most common one (the writers of
    full-size outputs decide, not an SE gate's), or None when it stays in the original order."""
    if not group.free:
        return None
    writers = [name for name in group.writers if name in layers]
    deciding = [name for name in writers if name not in group.pooled] or writers
    counts = Counter(_key(layers[name]) for name in deciding)
    if not counts:
        return None
    best = max(counts.values())
    leader = next(name for name in deciding if counts[_key(layers[name])] == best)
    order = layers[leader].channel_order
    return None if order is None else order.cpu()


def _key(ghost: GhostModule) -> tuple[int, ...] | None:
    return None if ghost.channel_order is None else tuple(ghost.channel_order.tolist())


def _plan_group(
    group: ChannelGroup, layers: dict[str, GhostModule], channel_at: torch.Tensor, edits: _Edits
) -> set[tuple[str, str, int]]:
    """Register the edits that put ``group``'s non-GhostModule layers in its new order."""
    keys: list[tuple[str, str, int] | None] = []
    model = edits.model
    for name in group.writers:
        if name in layers:
            continue
        module = model.get_submodule(name)
        keys += [edits.add(name, module, tensor, 0, 0, channel_at) for tensor in ("weight", "bias")]
    for use in group.through:
        module = model.get_submodule(use.module)
        tensors = ("weight", "bias") if isinstance(module, tuple(TORCH_CONVS)) else THROUGH_TENSORS
        keys += [edits.add(use.module, module, t, 0, use.offset, channel_at) for t in tensors]
    for use in group.readers:
        module = model.get_submodule(use.module)
        owner, name = module, use.module
        if isinstance(module, GhostModule):
            owner, name = module.primary_conv, f"{use.module}.primary_conv"
        keys.append(edits.add(name, owner, "weight", 1, use.offset, channel_at))
    return {key for key in keys if key is not None}
