"""Re-estimating BatchNorm running statistics on data, summed over every rank's shard.

A converted layer's outputs have other statistics than the original's, and a BatchNorm that
still normalises with the old ones shifts and scales every channel wrongly. Re-estimating them
on a few hundred unlabeled images is what makes a converted model agree with the original
again (torch's ``swa_utils.update_bn`` does the same for averaged weights; here the sums are
exact and all-reduced across ranks).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from . import distributed


def batchnorms(model: nn.Module) -> list[Any]:
    """The BatchNorms of ``model`` that keep running statistics."""
    return [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None
    ]


@torch.no_grad()
def set_statistics(batchnorm: Any, inputs: Iterable[torch.Tensor]) -> None:
    """Running mean and (unbiased) variance of ``batchnorm``'s inputs, over every rank's data."""
    device = batchnorm.running_mean.device
    total = torch.zeros(batchnorm.num_features, dtype=torch.float64, device=device)
    squares = torch.zeros_like(total)
    count = torch.zeros((), dtype=torch.float64, device=device)
    for x in inputs:
        # float32 sums per sample and channel, added in float64 (a float64 reduction over the
        # whole batch is ~30x slower on a CPU, and a per-sample sum does not depend on batching)
        flat = x.reshape(x.shape[0], x.shape[1], -1)
        total += flat.sum(dim=2).double().sum(dim=0)
        squares += torch.linalg.vector_norm(flat, dim=2).double().square().sum(dim=0)
        count += flat.shape[0] * flat.shape[2]
    distributed.all_reduce_sum([total, squares, count])
    mean = total / count
    variance = (squares / count - mean.square()).clamp_min(0.0) * count / (count - 1).clamp_min(1)
    batchnorm.running_mean.copy_(mean.to(batchnorm.running_mean.dtype))
    batchnorm.running_var.copy_(variance.to(batchnorm.running_var.dtype))


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor]) -> None:
    """Set every BatchNorm's running statistics to those of its inputs over ``batches``.

    One pass in training mode for the BatchNorms (each normalises with its batch's statistics,
    as during training) and eval mode for everything else (no dropout); the running statistics
    are then the exact mean and variance of each BatchNorm's inputs over all the batches.
    """
    found = batchnorms(model)
    if not found:
        return
    seen: dict[int, list[torch.Tensor]] = {id(bn): [] for bn in found}
    handles = [
        bn.register_forward_pre_hook(lambda m, args: seen[id(m)].append(_moments(args[0])))
        for bn in found
    ]
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    for bn in found:
        bn.train()
    try:
        for inputs in batches:
            model(inputs)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in flags:
            module.training = training
    for bn in found:
        _set_from_moments(bn, seen[id(bn)])


def _moments(x: torch.Tensor) -> torch.Tensor:
    """Per channel: sum, sum of squares, count (as one float64 tensor, to add up and reduce)."""
    flat = x.detach().transpose(0, 1).reshape(x.shape[1], -1).double()
    count = flat.new_full((x.shape[1],), flat.shape[1])
    return torch.stack([flat.sum(dim=1), flat.square().sum(dim=1), count])


def _set_from_moments(batchnorm: Any, moments: list[torch.Tensor]) -> None:
    if not moments:
        return  # never ran on this data: keep what it had
    total = torch.stack(moments).sum(dim=0)
    distributed.all_reduce_sum([total])
    sums, squares, count = total
    mean = sums / count
    variance = (squares / count - mean.square()).clamp_min(0.0) * count / (count - 1).clamp_min(1)
    batchnorm.running_mean.copy_(mean.to(batchnorm.running_mean.dtype))
    batchnorm.running_var.copy_(variance.to(batchnorm.running_var.dtype))
