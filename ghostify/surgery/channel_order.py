"""Channel order at model level: permute the consumers once instead of gathering every time.

A fitted GhostModule computes the original layer's channels in its own order (kept filters
first, then the ghosts by slot). Where its output flows only through per-channel layers
(BatchNorm, activations, depthwise convolutions) into convolutions, those layers' parameters are
permuted once, at conversion, and the GhostModule's gather is dropped. Where the channels meet a
residual add, a concatenation, a reshape, a shared layer or the model's output, the gather stays.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx, nn

from ..layers.conv_types import TORCH_CONVS, conv_type_of
from ..layers.ghost_module import GhostModule
from .graph import ACTIVATION, BATCHNORM, CONV, TracedGraph, node_kind
from .record import Permutation
from .swap import Transaction

_BN_TENSORS = ("weight", "bias", "running_mean", "running_var")


@dataclass
class _GraphView:
    """What the walk asks of one traced graph, computed once per conversion, not per layer."""

    modules: dict[str, nn.Module]  # called submodules, as the model holds them now
    calls: dict[str, int]
    sites: dict[str, list[fx.Node]]

    @classmethod
    def of(cls, traced: TracedGraph, model: nn.Module) -> _GraphView:
        sites: dict[str, list[fx.Node]] = {}
        for node in traced.graph.nodes:
            if node.op == "call_module":
                sites.setdefault(str(node.target), []).append(node)
        modules = {name: model.get_submodule(traced.prefix + name) for name in sites}
        return cls(modules, traced.call_counts(), sites)


@dataclass
class _Edit:
    module: str
    owner: nn.Module
    tensor: str
    dim: int


def fold_channel_orders(
    model: nn.Module,
    layers: dict[str, GhostModule],
    graphs: list[TracedGraph],
    changes: Transaction,
) -> dict[str, list[Permutation]]:
    """Drop the gather of every layer in ``layers`` whose consumers can absorb its order.

    ``layers`` maps names to the GhostModules now in ``model``. Returns, per folded layer, the
    permutations applied (all recorded in ``changes``, so a rollback undoes them).
    """
    folded: dict[str, list[Permutation]] = {}
    views: dict[int, _GraphView] = {}
    permutations: list[tuple[torch.Tensor, int, torch.Tensor]] = []
    for name, ghost in layers.items():
        if ghost.channel_order is None:
            continue
        edits = _plan_edits(name, model, graphs, views)
        if edits is None:
            continue
        order = ghost.channel_order
        channel_at = torch.empty_like(order)
        channel_at[order] = torch.arange(len(order), device=order.device)
        index = tuple(channel_at.tolist())
        applied = []
        for edit in edits:
            tensor = getattr(edit.owner, edit.tensor, None)
            if tensor is None:
                continue
            permutations.append((tensor, edit.dim, channel_at))
            applied.append(Permutation(edit.module, edit.tensor, edit.dim, index))
        changes.on_rollback(lambda ghost=ghost, order=order: ghost.set_channel_order(order))
        ghost.set_channel_order(None)
        folded[name] = applied
    changes.permute_all(permutations)
    return folded


def _plan_edits(
    name: str, model: nn.Module, graphs: list[TracedGraph], views: dict[int, _GraphView]
) -> list[_Edit] | None:
    """The tensors to permute so ``name``'s consumers read its own order, or None if impossible."""
    for traced in graphs:
        if not name.startswith(traced.prefix):
            continue
        if id(traced) not in views:
            views[id(traced)] = _GraphView.of(traced, model)
        view = views[id(traced)]
        sites = view.sites.get(name[len(traced.prefix) :], [])
        if not sites:
            continue
        if len(sites) != 1:
            return None  # called more than once: each call would need its own consumers
        return _walk(sites[0], traced.prefix, view)
    return None


def _walk(start: fx.Node, prefix: str, view: _GraphView) -> list[_Edit] | None:
    """Follow the output of ``start`` through per-channel layers to its consuming convolutions."""
    modules, calls = view.modules, view.calls
    edits: list[_Edit] = []
    frontier = list(start.users)
    visited: set[fx.Node] = set()
    while frontier:
        node = frontier.pop()
        if node in visited:
            continue
        visited.add(node)
        if len(node.all_input_nodes) != 1:
            return None  # mixes our channels with another tensor (add, cat, mul, ...)
        kind = node_kind(node, modules)
        module = modules.get(str(node.target)) if node.op == "call_module" else None
        qualified = f"{prefix}{node.target}"
        stateful = kind in (BATCHNORM, CONV) or isinstance(module, nn.PReLU)
        if stateful and calls.get(str(node.target), 0) != 1:
            return None  # a shared layer with parameters also sees other tensors
        if kind == BATCHNORM:
            edits += [_Edit(qualified, module, t, 0) for t in _BN_TENSORS]
            frontier += node.users
        elif kind == ACTIVATION:
            if isinstance(module, nn.PReLU) and module.num_parameters > 1:
                edits.append(_Edit(qualified, module, "weight", 0))
            frontier += node.users
        elif kind == CONV and module is not None:
            edit = _conv_edit(qualified, module)
            if edit is None:
                return None
            edits += edit
            if _is_depthwise(_conv_of(module)):
                frontier += node.users  # a depthwise conv keeps channels apart: look further
        else:
            return None
    return edits


def _conv_of(module: nn.Module) -> nn.Module:
    return module.primary_conv if isinstance(module, GhostModule) else module


def _is_depthwise(conv: nn.Module) -> bool:
    return (
        isinstance(conv, tuple(TORCH_CONVS))
        and conv.groups > 1
        and conv.groups == conv.in_channels == conv.out_channels
    )


def _conv_edit(name: str, module: nn.Module) -> list[_Edit] | None:
    """How a consuming convolution absorbs the order: input channels, or (depthwise) all."""
    if isinstance(module, GhostModule):
        kind = conv_type_of(module.primary_conv)
        if module.primary_conv.groups != 1 or kind is None or not kind.permute_inputs:
            return None
        return [_Edit(f"{name}.primary_conv", module.primary_conv, "weight", 1)]
    kind = conv_type_of(module)
    if kind is None or not kind.permute_inputs or type(module) is not kind.cls:
        return None  # an unknown subclass or a parametrization may use the weight otherwise
    if not kind.plain and _is_depthwise(module):
        return None  # its output channels too would be permuted: only torch's own convs
    if _is_depthwise(module):
        return [_Edit(name, module, "weight", 0), _Edit(name, module, "bias", 0)]
    if module.groups != 1:
        return None
    return [_Edit(name, module, "weight", 1)]
