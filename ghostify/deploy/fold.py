"""Folding each BatchNorm into the convolution or GhostModule right before it."""

from __future__ import annotations

import copy
from dataclasses import dataclass

from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from ..errors import ConfigError
from ..layers.conv_types import TORCH_CONVS
from ..layers.ghost_fold import shrink_cheap_kernel
from ..layers.ghost_module import GhostModule
from ..surgery.graph import TracedGraph
from ..surgery.swap import Transaction

_BATCHNORMS = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


@dataclass(frozen=True)
class Fold:
    """One BatchNorm folded into the layer before it, or left with the reason."""

    batchnorm: str
    into: str
    reason: str | None = None  # None when folded

    @property
    def folded(self) -> bool:
        return self.reason is None


def fold_batchnorms(
    model: nn.Module, graphs: list[TracedGraph], changes: Transaction
) -> list[Fold]:
    """Fold every BatchNorm whose only input is a GhostModule or torch conv called once."""
    folds: list[Fold] = []
    for traced in graphs:
        calls = traced.call_counts()
        for node in list(traced.graph.nodes):
            pair = _conv_bn_pair(node, traced, model, calls)
            if pair is None:
                continue
            (conv_name, conv), (bn_name, bn) = pair
            folds.append(_fold(conv_name, conv, bn_name, bn, changes))
    return folds


def _module(model: nn.Module, traced: TracedGraph, node: fx.Node) -> nn.Module | None:
    if node.op != "call_module":
        return None
    return model.get_submodule(traced.prefix + str(node.target))


def _conv_bn_pair(
    node: fx.Node, traced: TracedGraph, model: nn.Module, calls: dict[str, int]
) -> tuple[tuple[str, nn.Module], tuple[str, nn.Module]] | None:
    """``((conv name, conv), (bn name, bn))`` when ``node`` is a conv feeding only a BatchNorm."""
    conv = _module(model, traced, node)
    if isinstance(conv, GhostModule):
        dims = conv.dims
    elif type(conv) in TORCH_CONVS:
        dims = TORCH_CONVS[type(conv)]
    else:
        return None
    if calls.get(str(node.target)) != 1 or len(node.users) != 1:
        return None
    (user,) = node.users
    bn = _module(model, traced, user)
    if type(bn) is not _BATCHNORMS[dims] or calls.get(str(user.target)) != 1:
        return None
    return (traced.prefix + str(node.target), conv), (traced.prefix + str(user.target), bn)


def _fold(
    conv_name: str, conv: nn.Module, bn_name: str, bn: nn.BatchNorm2d, changes: Transaction
) -> Fold:
    if bn.running_mean is None or bn.running_var is None:
        return Fold(bn_name, conv_name, "no running statistics (track_running_stats=False)")
    if isinstance(conv, GhostModule):
        fused = copy.deepcopy(conv)
        fused.fuse_internal_batchnorms()
        try:
            fused.fold_batchnorm(bn)
        except ConfigError as error:
            return Fold(bn_name, conv_name, str(error))
    else:
        fused = fuse_conv_bn_eval(conv, bn)
    changes.replace(conv, fused)
    changes.replace(bn, nn.Identity())
    return Fold(bn_name, conv_name)


def shrink_cheap_kernels(model: nn.Module, changes: Transaction) -> list[str]:
    """Make every GhostModule's cheap op 1x1 where its other taps are all zero (exact)."""
    shrunk = []
    for name, module in list(model.named_modules()):
        if isinstance(module, GhostModule) and module.dw_size > 1:
            new = copy.deepcopy(module)
            if shrink_cheap_kernel(new):
                changes.replace(module, new)
                shrunk.append(name)
    return shrunk


def fuse_internal(model: nn.Module, changes: Transaction) -> list[str]:
    """Fold the internal BatchNorms of GhostNet-style GhostModules (``batch_norm=True``)."""
    fused = []
    for name, module in list(model.named_modules()):
        if isinstance(module, GhostModule) and not isinstance(module.primary_bn, nn.Identity):
            new = copy.deepcopy(module)
            new.fuse_internal_batchnorms()
            changes.replace(module, new)
            fused.append(name)
    return fused
