"""The two models a report counts: a safe copy of the converted one, and the original."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ..layers.conv_types import TORCH_CONVS, conv_type_of, widen
from ..layers.ghost_module import GhostModule
from ..surgery.record import record_of
from ..surgery.swap import replace_everywhere


def counting_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` in eval mode with no parameter requiring grad, safe to count.

    Some models keep autograd tensors from their last forward in plain attributes (torchvision's
    RAFT caches its correlation pyramid), which ``copy.deepcopy`` refuses; the copy gets detached
    versions instead. Parameters stop requiring grad because FlopCounterMode's module tracker
    hooks every grad-requiring input, and fails on a parameter view passed to a submodule under
    no_grad (timm's CaiT hands its class token to its blocks).
    """
    memo: dict[int, Any] = {}

    def detach_cached(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            if not value.is_leaf:
                memo[id(value)] = value.detach()
        elif isinstance(value, (list, tuple)):
            for item in value:
                detach_cached(item)
        elif isinstance(value, dict):
            for item in value.values():
                detach_cached(item)

    for module in model.modules():
        for key, value in vars(module).items():
            if key not in ("_parameters", "_buffers", "_modules"):
                detach_cached(value)
    copied = copy.deepcopy(model, memo)
    for param in copied.parameters():
        if param.is_leaf:  # a scripted or compiled submodule can expose derived tensors
            param.requires_grad_(False)
    return copied.eval()


def rebuild_original(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every GhostModule replaced by the convolution it stands for.

    The conversion record's kept original is used where there is one (copied, on the
    GhostModule's device); otherwise a stand-in of the same kind with zero weights (they do not
    affect counts, and not drawing random ones leaves the caller's random number
    generator untouched). Shared modules stay shared. The copy is for counting: channel-order
    folding is not undone (``ghostify.original_model`` does that).
    """
    original = counting_copy(model)
    record = record_of(original)
    kept = {
        name: row.original
        for row in (record.layers if record else [])
        if row.original is not None
        for name in (row.name, *row.aliases)
    }
    swaps: dict[int, nn.Module] = {}
    for name, module in original.named_modules(remove_duplicate=False):
        if not isinstance(module, GhostModule) or id(module) in swaps:
            continue
        weight = module.primary_conv.weight
        conv = kept.get(name)
        if conv is None:
            conv = _stand_in(module)
        conv = conv.to(device=weight.device, dtype=weight.dtype).requires_grad_(False)
        swaps[id(module)] = conv.train(module.training)
    return replace_everywhere(original, swaps)


def _stand_in(module: GhostModule) -> nn.Module:
    """A zero-weight layer costing what ``module``'s original did: torch's conv of its settings,
    or a widened copy of its primary when that is another kind (a timm or user conv type)."""
    kind = conv_type_of(module.primary_conv)
    if kind is not None and not kind.plain:
        return widen(module.primary_conv, module.out_channels)
    weight = module.primary_conv.weight
    cls = next(c for c, dims in TORCH_CONVS.items() if dims == module.dims)
    conv = nn.utils.skip_init(cls, **module.conv_config(), device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        for param in conv.parameters():
            param.zero_()
    return conv
