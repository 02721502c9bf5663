"""The slot assignment: optimal (against brute force and scipy), with lapjv (the ``fast`` extra)
and without it; lapjv's float32 answer kept only when the float64 bound certifies it; the same
layout whichever solver ran."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment

import ghostify
from ghostify.fit import assignment
from ghostify.fit.assignment import assign_balanced, optimal_assignment

LAPJV = assignment._lapjv
needs_lapjv = pytest.mark.skipif(LAPJV is None, reason="the fast extra (lapjv) is not installed")


@contextmanager
def solver(fast: bool, lapjv=LAPJV) -> Iterator[None]:
    """Assignments with lapjv (``fast``, or the given stand-in) or with scipy alone."""
    saved = assignment._lapjv
    assignment._lapjv = lapjv if fast else None
    try:
        yield
    finally:
        assignment._lapjv = saved


class Spy:
    """lapjv, counting its calls."""

    def __init__(self, solve=LAPJV) -> None:
        self.solve, self.calls = solve, 0

    def __call__(self, matrix: np.ndarray):
        self.calls += 1
        return self.solve(matrix)


def optimum(matrix: np.ndarray) -> float:
    rows, cols = linear_sum_assignment(matrix)
    return float(matrix[rows, cols].sum())


@pytest.mark.parametrize("fast", [pytest.param(True, marks=needs_lapjv), False])
@settings(max_examples=60, deadline=None)
@given(
    kept=st.integers(1, 3),
    per_kept=st.integers(1, 2),
    spare=st.integers(0, 2),
    seed=st.integers(0, 2**16),
    ties=st.booleans(),
)
def test_the_slot_assignment_is_optimal(
    fast: bool, kept: int, per_kept: int, spare: int, seed: int, ties: bool
) -> None:
    # ``spare`` slots more than ghosts, as when out_channels is not a multiple of the ratio.
    rng = np.random.default_rng(seed)
    slots = kept * per_kept
    n = max(1, slots - spare)
    cost = rng.random((n, kept))
    if ties:  # few distinct values: many optimal assignments
        cost = np.round(cost * 3)
    slot_source = torch.from_numpy(rng.permutation(np.repeat(np.arange(kept), per_kept)))
    with solver(fast):
        slot = assign_balanced(torch.from_numpy(cost), slot_source).numpy()
    assert len(set(slot)) == n and all(0 <= j < slots for j in slot)  # one ghost per slot
    source = slot_source.numpy()
    got = cost[np.arange(n), source[slot]].sum()
    best = min(
        cost[np.arange(n), source[list(order)]].sum()
        for order in itertools.permutations(range(slots), n)
    )
    assert got <= best + 1e-9


@needs_lapjv
@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 160),
    offset=st.floats(0.0, 1e6),
    spread=st.floats(-3.0, 3.0),
    seed=st.integers(0, 2**16),
)
def test_lapjv_answers_are_certified_optimal(
    n: int, offset: float, spread: float, seed: int
) -> None:
    # Rows of very different scales on top of a large common part: float32 alone would lose
    # the differences that decide the assignment (the row minima go first, in float64).
    rng = np.random.default_rng(seed)
    scale = 10.0 ** rng.uniform(-abs(spread), abs(spread), size=(n, 1))
    matrix = offset + scale * rng.random((n, n))
    spy = Spy()
    with solver(True, spy):
        rows, cols = optimal_assignment(matrix)
        certified = assignment._certified_lapjv(matrix)
    assert spy.calls == 2 and np.array_equal(rows, np.arange(n))
    assert certified is not None and np.array_equal(certified, cols)  # lapjv's answer, kept
    assert sorted(cols) == list(range(n))
    # The promise: within a millionth of the optimum's cost above the rows' minima, or of the
    # largest cost above a row's minimum when that is larger.
    best, row_min = optimum(matrix), matrix.min(axis=1)
    scale = max(best - row_min.sum(), (matrix - row_min[:, None]).max())
    assert matrix[rows, cols].sum() <= best + 1e-6 * scale + 1e-12 * abs(best)


@needs_lapjv
def test_an_answer_the_bound_cannot_certify_goes_to_scipy() -> None:
    matrix = np.random.default_rng(0).random((40, 40))

    def identity(reduced: np.ndarray):  # a wrong answer: the diagonal, no prices
        n = len(reduced)
        zeros = np.zeros(n, dtype=np.float32)
        return np.arange(n, dtype=np.int32), np.arange(n, dtype=np.int32), (0.0, zeros, zeros)

    spy = Spy(identity)
    with solver(True, spy):
        rows, cols = optimal_assignment(matrix)
    assert spy.calls == 1
    assert matrix[rows, cols].sum() == pytest.approx(optimum(matrix), rel=1e-12)
    assert matrix[rows, cols].sum() < matrix.trace()


@needs_lapjv
def test_costs_beyond_float32_go_to_scipy() -> None:
    matrix = np.random.default_rng(1).random((12, 12))
    matrix[3, 5] = 1e35  # a difference float32 cannot hold
    spy = Spy()
    with solver(True, spy):
        rows, cols = optimal_assignment(matrix)
    assert spy.calls == 0
    assert matrix[rows, cols].sum() == pytest.approx(optimum(matrix), rel=1e-12)


@settings(max_examples=60, deadline=None)
@given(
    kept=st.integers(1, 6), per_kept=st.integers(1, 4), spare=st.integers(0, 3), seed=st.integers()
)
def test_ghosts_take_their_kept_filters_lowest_slots_in_order(
    kept: int, per_kept: int, spare: int, seed: int
) -> None:
    rng = np.random.default_rng(seed % 2**32)
    source = rng.permutation(np.repeat(np.arange(kept), per_kept))
    n = max(1, len(source) - spare)
    slot = rng.permutation(len(source))[:n]  # any one-ghost-per-slot assignment
    placed = assignment._in_slot_order(slot, source)
    assert np.array_equal(source[placed], source[slot])  # each ghost reads the same filter
    for filter_index in range(kept):
        ghosts = np.flatnonzero(source[slot] == filter_index)  # in ghost order
        lowest = np.flatnonzero(source == filter_index)[: len(ghosts)]
        assert placed[ghosts].tolist() == lowest.tolist()


@needs_lapjv
@pytest.mark.parametrize(("name", "ratio"), [("resnet18", 2), ("resnet18", 3)])
def test_conversions_do_not_depend_on_the_solver(name: str, ratio: int) -> None:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)()
    twin = copy.deepcopy(model)
    spy = Spy()
    with solver(True, spy):
        ghostify.convert(model, ratio=ratio, progress=False)
    with solver(False):
        ghostify.convert(twin, ratio=ratio, progress=False)
    assert spy.calls > 0
    ours, theirs = model.state_dict(), twin.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[key], theirs[key]) for key in ours)
