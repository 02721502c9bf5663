"""One form per layer, least total loss, total cost within a limit: solved exactly.

A dynamic program over the layers keeps, after each layer, the Pareto frontier of partial plans:
every (total cost, total loss) reachable by the layers so far that no other partial plan beats
on both. A plan dropped there can never be part of an optimum (any completion of it is matched
by the same completion of the plan that dominates it), so the frontier after the last layer holds
every optimal plan for every limit at once; the optimum under a limit is the lowest-loss frontier
point within it. Nothing is rounded: integer costs (MACs, parameters) stay exact integers, and
measured milliseconds are compared as they are. (SPDY buckets the time budget instead, which
makes the answer exact only to the bucket width.)

The frontier stays small in practice (thousands of points for ResNet-50's 52 layers with a
dozen forms each; under a second); ``max_points`` bounds it for pathological inputs, and then
the answer is marked inexact.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

MAX_POINTS = 200_000


@dataclass
class Frontier:
    """Every Pareto-optimal plan: ``cost`` ascending, ``loss`` strictly descending.

    ``plan(i)`` is the form index per layer of point ``i``. ``exact`` is False when the frontier
    had to be thinned (``max_points``)."""

    cost: np.ndarray
    loss: np.ndarray
    _parents: list[np.ndarray]
    _choices: list[np.ndarray]
    exact: bool = True

    def __len__(self) -> int:
        return len(self.cost)

    def plan(self, index: int) -> list[int]:
        picks = []
        for parents, choices in zip(reversed(self._parents), reversed(self._choices), strict=True):
            picks.append(int(choices[index]))
            index = int(parents[index])
        return picks[::-1]

    def best_within(self, limit: float) -> int | None:
        """The index of the lowest-loss plan with cost <= ``limit``, or None if none is."""
        count = int(np.searchsorted(self.cost, limit, side="right"))
        return count - 1 if count else None


def pareto_frontier(
    costs: Sequence[Sequence[float]],
    losses: Sequence[Sequence[float]],
    *,
    max_points: int = MAX_POINTS,
) -> Frontier:
    """The Pareto frontier of total (cost, loss) over one choice per layer.

    ``costs[l][c]`` and ``losses[l][c]``: layer ``l`` in form ``c``. Costs may be ints (kept
    exact, int64) or floats.
    """
    integer = all(np.asarray(c).dtype.kind in "iu" for c in costs)
    dtype = np.int64 if integer else np.float64
    total_cost = np.zeros(1, dtype=dtype)
    total_loss = np.zeros(1, dtype=np.float64)
    parents: list[np.ndarray] = []
    choices: list[np.ndarray] = []
    exact = True
    for layer_cost, layer_loss in zip(costs, losses, strict=True):
        layer_cost = np.asarray(layer_cost, dtype=dtype)
        layer_loss = np.asarray(layer_loss, dtype=np.float64)
        cost = (total_cost[:, None] + layer_cost[None, :]).ravel()
        loss = (total_loss[:, None] + layer_loss[None, :]).ravel()
        keep = _nondominated(cost, loss)
        if len(keep) > max_points:  # thin evenly along the frontier: no longer exact
            keep = keep[np.linspace(0, len(keep) - 1, max_points).round().astype(np.int64)]
            exact = False
        count = len(layer_cost)
        parents.append(keep // count)
        choices.append(keep % count)
        total_cost, total_loss = cost[keep], loss[keep]
    return Frontier(total_cost, total_loss, parents, choices, exact)


def _nondominated(cost: np.ndarray, loss: np.ndarray) -> np.ndarray:
    """Indices of the points no other point beats: sorted by cost, each strictly lower in loss
    than every cheaper point (of equal points, the first)."""
    order = np.lexsort((loss, cost))
    sorted_loss = loss[order]
    best_before = np.minimum.accumulate(sorted_loss)
    keep = np.ones(len(order), dtype=bool)
    keep[1:] = sorted_loss[1:] < best_before[:-1]
    return order[keep]


def solve(
    costs: Sequence[Sequence[float]], losses: Sequence[Sequence[float]], limit: float
) -> list[int] | None:
    """The form index per layer minimising total loss with total cost <= ``limit`` (None if
    no plan fits)."""
    frontier = pareto_frontier(costs, losses)
    index = frontier.best_within(limit)
    return None if index is None else frontier.plan(index)
