"""How much of a layer's output error reaches the model's output: one weight per layer.

A layer's loss is its relative output error; layers differ in how much such an error matters
downstream. Three proxies (``Budget(sensitivity=...)``; ``benchmarks/budget.py --proxies``
measures which ranks forms best against end-to-end agreement):

- ``"none"``: every layer alike.
- ``"batchnorm"``: the following BatchNorm's gain on the layer's output energy,
  ``mean_c gamma_c^2 (var_c + mean_c^2) / (var_c + eps)`` from its running statistics: the
  energy of the normalised output that a unit relative error becomes (1 without a BatchNorm).
- ``"probe"``: a gradient probe. Noise of relative energy ``e`` in layer ``l``'s output
  ``y_l`` changes the model's output by ``J_l noise``, of expected energy
  ``e * mean(y_l^2) * |J_l|_F^2``; ``|J_l|_F^2`` is estimated as ``E |J_l^T v|^2`` over random
  output directions ``v`` (Hutchinson), one backward pass per direction giving every layer's at
  once. The weight is that energy over the output's own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..inputs import eval_mode
from ..surgery.discovery import ConvSite
from ..surgery.graph import BATCHNORM

PROBE_DIRECTIONS = 4


def batchnorm_weights(model: nn.Module, sites: Sequence[ConvSite]) -> dict[str, float]:
    """``"batchnorm"`` weights (see the module docstring) of each site."""
    weights = {}
    for site in sites:
        batchnorm = following_batchnorm(model, site)
        if batchnorm is None or batchnorm.running_var is None:
            weights[site.name] = 1.0
            continue
        var, mean = batchnorm.running_var.double(), batchnorm.running_mean.double()
        gain = 1.0 / (var + batchnorm.eps)
        if batchnorm.weight is not None:
            gain = gain * batchnorm.weight.detach().double().square()
        weights[site.name] = float((gain * (var + mean.square())).mean())
    return weights


def following_batchnorm(model: nn.Module, site: ConvSite) -> nn.Module | None:
    """The BatchNorm that alone reads ``site``'s output, or None."""
    if len(site.consumers) != 1 or site.consumers[0].kind != BATCHNORM:
        return None
    return model.get_submodule(site.consumers[0].target)


def probe_weights(
    model: nn.Module,
    sites: Sequence[ConvSite],
    args: tuple[Any, ...],
    directions: int = PROBE_DIRECTIONS,
    seed: int = 0,
) -> dict[str, float]:
    """``"probe"`` weights (see the module docstring) of each site, on ``args``."""
    taps: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {s.name: [] for s in sites}

    def tap(name: str):
        def hook(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
            # An added zero: its gradient is the output's, and nothing later (an in-place
            # activation) can change the tensor the gradient is taken at.
            zero = torch.zeros_like(output, requires_grad=True)
            taps[name].append((output.detach(), zero))
            return output + zero

        return hook

    handles = [site.module.register_forward_hook(tap(site.name)) for site in sites]
    generator = torch.Generator().manual_seed(seed)
    try:
        with eval_mode(model), torch.enable_grad():
            outputs = [
                t
                for t in torch.utils._pytree.tree_leaves(model(*args))
                if isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad
            ]
            called = [(name, pairs) for name, pairs in taps.items() if pairs]
            zeros = [zero for _, pairs in called for _, zero in pairs]
            energy = sum(float(o.detach().double().square().sum()) for o in outputs)
            if not outputs or not zeros or energy == 0:
                return {site.name: 1.0 for site in sites}
            jacobian_sq = [0.0] * len(zeros)
            for step in range(directions):
                projection = sum(
                    (o * torch.randn(o.shape, generator=generator).to(o)).sum() for o in outputs
                )
                grads = torch.autograd.grad(
                    projection, zeros, retain_graph=step < directions - 1, allow_unused=True
                )
                for index, grad in enumerate(grads):
                    if grad is not None:
                        jacobian_sq[index] += float(grad.double().square().sum()) / directions
    finally:
        for handle in handles:
            handle.remove()
    weights, index = {}, 0
    for name, pairs in called:
        total = 0.0
        for output, _ in pairs:  # a layer called several times: every call's share
            total += float(output.double().square().mean()) * jacobian_sq[index]
            index += 1
        weights[name] = total / energy
    for site in sites:  # never called on these inputs: no evidence, the median weight
        if site.name not in weights:
            known = sorted(weights.values())
            weights[site.name] = known[len(known) // 2] if known else 1.0
    return weights
