"""The intrinsic refit without the input Gram matrix: conjugate gradients on the ridge problem.

The exact refit (``data_driven.refit_filters``) solves ``(X'X + l I) w = X'y + l w0`` from the
input-patch Gram ``X'X``, which has ``(in_channels / groups * taps + 1)^2`` entries per group:
34 GB in float64 for ``Conv2d(1024, 128, (64, 1))``. Here the same system is solved by
preconditioned conjugate gradients, every product ``X'X w`` computed as a convolution over the
stored inputs and its weight gradient (``torch.nn.grad.conv*d_weight``), so the memory is a few
weight-sized tensors and one batch of the layer's output. Each iteration reads the data once;
the Jacobi preconditioner (the diagonal of ``X'X``) and the starting point ``w0`` (the original
filter, the ridge's own prior) keep the count small. All columns (output channels) iterate
together, each with its own step sizes; sums are all-reduced across ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .patches import pad_like

Pairs = Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]]
Reduce = Callable[[list[torch.Tensor]], None]

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_WEIGHT_GRAD = {
    1: torch.nn.grad.conv1d_weight,
    2: torch.nn.grad.conv2d_weight,
    3: torch.nn.grad.conv3d_weight,
}


@dataclass
class CGResult:
    """What the iterative refit returns: the filters, residuals and how far it got."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    residual: torch.Tensor  # (out,): squared error of each refitted filter on all the data
    positions: int  # positions summed (per channel)
    iterations: int
    relative_residual: float  # of the normal equations at the end (worst channel)


class _Operator:
    """``X'X`` (plus the constant column) applied through convolutions over the data."""

    def __init__(self, conv: nn.Module, pairs: Pairs, reduce: Reduce) -> None:
        self.conv = conv
        self.pairs = pairs
        self.reduce = reduce
        self.dims = conv.weight.dim() - 2
        self.with_bias = conv.bias is not None

    def _forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        conv = self.conv
        return _CONV[self.dims](
            pad_like(conv, x),
            weight.to(x.dtype),
            None if bias is None else bias.to(x.dtype),
            conv.stride,
            0,
            conv.dilation,
            conv.groups,
        )

    def _backward(self, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        conv = self.conv
        return _WEIGHT_GRAD[self.dims](
            pad_like(conv, x), conv.weight.shape, grad, conv.stride, 0, conv.dilation, conv.groups
        ).double()

    def apply(self, weight: torch.Tensor, bias: torch.Tensor | None):
        """``(X'X w, 1'X w)`` summed over all the data (bias column included)."""
        out_w = torch.zeros_like(weight)
        out_b = None if bias is None else torch.zeros_like(bias)
        for x, _ in self.pairs():
            y = self._forward(x, weight, bias)
            out_w += self._backward(x, y)
            if out_b is not None:
                out_b += y.double().sum(dim=[0, *range(2, y.dim())])
        self.reduce([out_w] if out_b is None else [out_w, out_b])
        return out_w, out_b

    def statistics(self):
        """``X'y``, ``1'y``, the diagonal of ``X'X``, and the positions summed, in one pass."""
        conv = self.conv
        cross = torch.zeros(conv.weight.shape, dtype=torch.float64, device=conv.weight.device)
        diagonal = torch.zeros_like(cross)
        target_sum = torch.zeros(conv.out_channels, dtype=torch.float64, device=cross.device)
        count = torch.zeros((), dtype=torch.float64, device=cross.device)
        for x, y in self.pairs():
            cross += self._backward(x, y)
            diagonal += self._backward(x.square(), torch.ones_like(y))
            target_sum += y.double().sum(dim=[0, *range(2, y.dim())])
            count += y[:, 0].numel()
        self.reduce([cross, diagonal, target_sum, count])
        return cross, diagonal, target_sum, count

    def residuals(self, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``|y - Xw - b|^2`` per output channel, over all the data."""
        total = torch.zeros(self.conv.out_channels, dtype=torch.float64, device=weight.device)
        for x, y in self.pairs():
            error = (self._forward(x, weight, bias) - y).double()
            total += error.square().sum(dim=[0, *range(2, y.dim())])
        self.reduce([total])
        return total


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per output channel (first dimension) inner products."""
    return (a * b).flatten(1).sum(dim=1)


@torch.no_grad()
def refit_filters_cg(
    conv: nn.Module,
    pairs: Pairs,
    strength: float,
    *,
    reduce: Reduce = lambda tensors: None,
    tolerance: float = 1e-3,
    max_iterations: int = 40,
) -> CGResult:
    """Ridge refit of ``conv``'s filters towards themselves on ``pairs()`` (inputs, targets).

    The same problem as ``data_driven.refit_filters``: ``l`` is ``strength`` times the mean
    diagonal of each group's Gram matrix (the constant column included where there is a bias).
    Stops when every channel's normal-equation residual is below ``tolerance`` times its
    right-hand side, or after ``max_iterations`` passes over the data.
    """
    operator = _Operator(conv, pairs, reduce)
    prior_w = conv.weight.detach().double()
    prior_b = None if conv.bias is None else conv.bias.detach().double()
    cross, diagonal, target_sum, count = operator.statistics()
    groups = conv.groups
    per_group = conv.out_channels // groups
    # One diagonal per group (every output channel of a group sees the same inputs).
    group_diag = diagonal.view(groups, per_group, -1)[:, 0]
    size = group_diag.shape[1] + int(prior_b is not None)
    mean = (group_diag.sum(dim=1) + (count if prior_b is not None else 0.0)) / size
    ridge = (strength * mean.clamp_min(1e-12)).repeat_interleave(per_group)  # (out,)
    shape = (-1, *[1] * (prior_w.dim() - 1))

    def system(w: torch.Tensor, b: torch.Tensor | None):
        aw, ab = operator.apply(w, b)
        aw = aw + ridge.view(shape) * w
        if ab is not None:
            ab = ab + ridge * b
        return aw, ab

    rhs_w = cross + ridge.view(shape) * prior_w
    rhs_b = None if prior_b is None else target_sum + ridge * prior_b
    precond_w = 1.0 / (diagonal + ridge.view(shape))
    precond_b = None if prior_b is None else 1.0 / (count + ridge)

    def inner(aw, ab, bw, bb) -> torch.Tensor:
        value = _dot(aw, bw)
        return value if ab is None else value + ab * bb

    w, b = prior_w.clone(), None if prior_b is None else prior_b.clone()
    aw, ab = system(w, b)
    rw = rhs_w - aw
    rb = None if rhs_b is None else rhs_b - ab
    rhs_norm = inner(rhs_w, rhs_b, rhs_w, rhs_b).sqrt().clamp_min(1e-30)
    zw = precond_w * rw
    zb = None if rb is None else precond_b * rb
    pw, pb = zw.clone(), None if zb is None else zb.clone()
    rz = inner(rw, rb, zw, zb)
    iterations = 0
    relative = float((inner(rw, rb, rw, rb).sqrt() / rhs_norm).max())
    while relative > tolerance and iterations < max_iterations:
        qw, qb = system(pw, pb)
        step = rz / inner(pw, pb, qw, qb).clamp_min(1e-300)
        w += step.view(shape) * pw
        rw -= step.view(shape) * qw
        if b is not None:
            b += step * pb
            rb -= step * qb
        zw = precond_w * rw
        zb = None if rb is None else precond_b * rb
        rz_next = inner(rw, rb, zw, zb)
        beta = rz_next / rz.clamp_min(1e-300)
        pw = zw + beta.view(shape) * pw
        pb = None if pb is None else zb + beta * pb
        rz = rz_next
        iterations += 1
        relative = float((inner(rw, rb, rw, rb).sqrt() / rhs_norm).max())
    weight = w.to(conv.weight.dtype)
    bias = None if b is None else b.to(conv.weight.dtype)
    residual = operator.residuals(weight, bias)
    return CGResult(weight, bias, residual, int(count.item()), iterations, relative)
