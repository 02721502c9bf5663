"""The budget solver against brute force: the optimum on small problems, every limit at once."""

from __future__ import annotations

import itertools

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from ghostify.budget.solver import pareto_frontier, solve

# A layer: 1-4 forms, each a (cost, loss) pair; costs as ints or floats.
_int_layer = st.lists(
    st.tuples(st.integers(0, 50), st.integers(0, 20).map(float)), min_size=1, max_size=4
)
_float_layer = st.lists(
    st.tuples(st.floats(0, 10, allow_nan=False), st.floats(0, 5, allow_nan=False)),
    min_size=1,
    max_size=4,
)


def _brute_force(costs, losses, limit):
    """The lowest loss of any plan within ``limit`` (None if none is)."""
    best = None
    for plan in itertools.product(*(range(len(c)) for c in costs)):
        cost = sum(costs[layer][c] for layer, c in enumerate(plan))
        loss = sum(losses[layer][c] for layer, c in enumerate(plan))
        if cost <= limit and (best is None or loss < best):
            best = loss
    return best


def _split(layers):
    return [[c for c, _ in layer] for layer in layers], [
        [loss for _, loss in layer] for layer in layers
    ]


@given(st.lists(_int_layer, min_size=1, max_size=5), st.integers(0, 200))
def test_integer_costs_optimum_equals_brute_force(layers, limit) -> None:
    costs, losses = _split(layers)
    plan = solve(costs, losses, limit)
    best = _brute_force(costs, losses, limit)
    if best is None:
        assert plan is None
        return
    assert plan is not None
    assert sum(costs[layer][c] for layer, c in enumerate(plan)) <= limit
    assert sum(losses[layer][c] for layer, c in enumerate(plan)) == best


@given(st.lists(_float_layer, min_size=1, max_size=5), st.floats(0, 40, allow_nan=False))
def test_float_costs_optimum_equals_brute_force(layers, limit) -> None:
    costs, losses = _split(layers)
    plan = solve(costs, losses, limit)
    best = _brute_force(costs, losses, limit)
    if best is None:
        assert plan is None
        return
    assert plan is not None
    assert sum(costs[layer][c] for layer, c in enumerate(plan)) <= limit + 1e-9
    assert np.isclose(sum(losses[layer][c] for layer, c in enumerate(plan)), best)


@given(st.lists(_int_layer, min_size=1, max_size=4))
def test_frontier_holds_every_pareto_optimal_total_and_nothing_else(layers) -> None:
    costs, losses = _split(layers)
    totals = {
        (
            sum(costs[layer][c] for layer, c in enumerate(plan)),
            sum(losses[layer][c] for layer, c in enumerate(plan)),
        )
        for plan in itertools.product(*(range(len(c)) for c in costs))
    }
    pareto = {
        p for p in totals if not any(q != p and q[0] <= p[0] and q[1] <= p[1] for q in totals)
    }
    frontier = pareto_frontier(costs, losses)
    assert set(zip(frontier.cost.tolist(), frontier.loss.tolist(), strict=True)) == pareto
    assert frontier.exact
    for index in range(len(frontier)):  # each point's plan adds up to it
        plan = frontier.plan(index)
        assert sum(costs[layer][c] for layer, c in enumerate(plan)) == frontier.cost[index]


def test_integer_costs_stay_exact_beyond_float_precision() -> None:
    """MAC counts of large models: sums past 2**53 must not round (float64 would take
    2**60 + 1 for 2**60 and accept a plan over the limit)."""
    big = 2**60
    costs = [[big + 1, big], [3, 1]]
    losses = [[0.0, 1.0], [0.0, 1.0]]
    assert solve(costs, losses, big + 4) == [0, 0]
    assert solve(costs, losses, big + 2) == [0, 1]
    assert solve(costs, losses, big + 1) == [1, 1]
    assert solve(costs, losses, big) is None
