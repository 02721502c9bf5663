"""Which cheap-conv slot each ghost takes: a minimum-cost assignment, one ghost per slot.

Square problems (one slot per ghost, the common case) go to the Jonker-Volgenant solver of the
``lapjv`` package when it is installed (the ``fast`` extra): it works in float32 with AVX2, about
3x faster than scipy here, and releases the GIL, so the other fit worker keeps running. Its answer
is checked in float64 against a lower bound on the optimum built from its dual prices, and kept
only when provably within ``_TOLERANCE`` of the optimum; otherwise, for rectangular problems and
without ``lapjv``, scipy's exact solver decides.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

try:  # the `fast` extra
    from lapjv import lapjv as _lapjv
except ImportError:  # scipy alone: the same optimum, about 3x slower
    _lapjv = None

# Layers with more ghosts than this are assigned greedily (the exact methods are cubic).
_EXACT_ASSIGNMENT = 4096
# lapjv's assignment is kept when its cost above the rows' minima is certified within this
# fraction of the optimum's, or of the largest cost above a row's minimum if that is larger
# (float32 rounding leaves ~3e-8 on ResNet-50's layers).
_TOLERANCE = 1e-6
# Reduced costs beyond this are not solved in float32.
_FLOAT32_RANGE = 1e30
# How far a float32 rounding of a float64 difference may be from the exact difference,
# relative to it: float32's 2^-24, and the float64 subtraction's 2^-53, with room to spare.
_ROUNDING = 2.0**-22
# ...and absolutely, below float32's normal range (its smallest subnormal).
_UNDERFLOW = 2.0**-149
# Cost values built and read at once (256 KB in float64: a block stays in the core's cache).
_BLOCK = 32768


class CostRows(Protocol):
    """A cost matrix that can be built a block of rows at a time (``rows``) or whole
    (``dense``), float64; e.g. ``pair_costs.PairCosts``, which never stores it whole for
    lapjv."""

    @property
    def shape(self) -> tuple[int, int]: ...

    def rows(self, block: slice) -> np.ndarray: ...

    @property
    def dense(self) -> np.ndarray: ...


class _Dense:
    """A cost matrix held whole, as ``CostRows``."""

    def __init__(self, matrix: np.ndarray) -> None:
        self.dense = matrix
        self.shape = matrix.shape

    def rows(self, block: slice) -> np.ndarray:
        return self.dense[block]


def assign_balanced(cost: torch.Tensor | CostRows, slot_source: torch.Tensor) -> torch.Tensor:
    """The slot each ghost takes, minimising the total cost, with one ghost per slot.

    Slot ``j`` reads kept filter ``slot_source[j]``, so each kept filter feeds as many ghosts as
    it has slots (the balanced layout a gather-free GhostModule computes). ``cost[g, s]`` is the
    cost of ghost ``g`` reading kept filter ``s`` (a tensor, or ``CostRows``). An optimal
    assignment (``optimal_assignment``) up to ``_EXACT_ASSIGNMENT`` ghosts; beyond that a
    greedy one, cheapest pairs first.
    """
    source = slot_source.cpu().numpy()
    costs = _Dense(cost.numpy()) if isinstance(cost, torch.Tensor) else cost
    # The matrix as given when slot j reads kept filter j, for every kept filter.
    one_each = costs.shape[1] == len(source) and np.array_equal(source, np.arange(len(source)))
    if not one_each:
        costs = _Dense(costs.dense.take(source, axis=1))
    n = costs.shape[0]
    slot = np.full(n, -1, dtype=np.int64)
    if n <= _EXACT_ASSIGNMENT:
        rows, cols = optimal_assignment(costs)
        slot[rows] = cols
    else:
        taken = np.zeros(n, dtype=bool)
        for flat in np.argsort(costs.dense, axis=None, kind="stable"):
            g, j = divmod(int(flat), n)
            if slot[g] < 0 and not taken[j]:
                slot[g], taken[j] = j, True
    # With one slot per kept filter, there is one placement: the assignment's.
    return torch.from_numpy(slot if one_each else _in_slot_order(slot, source))


def _in_slot_order(slot: np.ndarray, source: np.ndarray) -> np.ndarray:
    """``slot`` with the ghosts of each kept filter in its lowest slots, in ghost order.

    A kept filter's slots are interchangeable (the same cost), so solvers may place its ghosts
    in any of them; this one placement makes the layout independent of the solver.
    """
    feeds = source[slot]
    ghosts = np.lexsort((np.arange(len(slot)), feeds))  # by kept filter, then ghost index
    slots = np.argsort(source, kind="stable")  # by kept filter, then slot index
    ordered = feeds[ghosts]
    first_slot = np.searchsorted(source[slots], ordered)
    rank = np.arange(len(slot)) - np.searchsorted(ordered, ordered)  # among the filter's ghosts
    placed = np.empty_like(slot)
    placed[ghosts] = slots[first_slot + rank]
    return placed


def optimal_assignment(matrix: np.ndarray | CostRows) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, cols)``: every row of the float64 ``matrix`` (rows <= columns) takes column
    ``cols[i]`` of ``rows[i]``, at minimum total cost (see the module docstring)."""
    costs = _Dense(matrix) if isinstance(matrix, np.ndarray) else matrix
    rows, columns = costs.shape
    if _lapjv is not None and rows == columns > 0:
        cols = _certified_lapjv(costs)
        if cols is not None:
            return np.arange(rows), cols
    order, reduced = _reduced(costs.dense)
    found_rows, cols = linear_sum_assignment(reduced)
    return order[found_rows], cols


def _certified_lapjv(matrix: np.ndarray | CostRows) -> np.ndarray | None:
    """lapjv's column for each row of the square ``matrix``, or None when it cannot be shown
    within ``_TOLERANCE`` of the optimum.

    The rows' minima are subtracted in float64 first, so float32 keeps the differences that
    decide the assignment, not the large common part. The check: for lapjv's column prices
    ``v``, ``u_i = min_j (matrix_ij - min_i - v_j)`` makes every reduced cost non-negative, so
    ``sum(u) + sum(v)`` is at most the cost of any assignment (LP duality); the gap between it
    and the assignment found bounds how far from optimal that is (``_TOLERANCE``). The float64
    matrix is only ever built a block of rows at a time, and the check reads the float32
    matrix with bounds on its rounding (``_ROUNDING``).
    """
    costs = _Dense(matrix) if isinstance(matrix, np.ndarray) else matrix
    n = costs.shape[0]
    step = max(1, _BLOCK // n)
    blocks = [slice(start, min(start + step, n)) for start in range(0, n, step)]
    row_min = np.empty(n)
    reduced = np.empty((n, n), dtype=np.float32)
    for block in blocks:
        part = costs.rows(block)
        part.min(axis=1, out=row_min[block])
        np.subtract(part, row_min[block, None], out=reduced[block], casting="same_kind")
    peak = reduced.max()
    if not peak < _FLOAT32_RANGE:  # also catches inf and NaN
        return None
    cols, _, (_, _, prices) = _lapjv(reduced)
    cols = cols.astype(np.int64)
    prices = prices.astype(np.float64)
    # The check reads the float32 matrix, not the float64 one again: the reduced costs are
    # >= 0, and each float32 value is within _ROUNDING of its own size of the float64 value
    # (and within _UNDERFLOW of it below float32's normal range).
    found = reduced[np.arange(n), cols].sum(dtype=np.float64) * (1 + _ROUNDING)
    row_values = np.empty(n)
    for block in blocks:
        part = reduced[block].astype(np.float64)
        part *= 1 - _ROUNDING
        part -= prices
        part.min(axis=1, out=row_values[block])
    bound = row_values.sum() + prices.sum()
    # Values below float32's normal range may each be off by _UNDERFLOW: a gap of that size
    # is allowed (the all-zero matrix has no other).
    if found - bound <= _TOLERANCE * max(found, float(peak)) + 2 * n * _UNDERFLOW:
        return cols
    return None


def _reduced(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The assignment problem ``matrix`` in the form scipy solves fastest: ``(order, reduced)``,
    where row ``i`` of ``reduced`` is row ``order[i]`` of ``matrix``, and the optimal assignments
    of the two are the same.

    Subtracting each row's minimum drops every assignment's total by the same amount, so the
    optimum stays; so does each column's when every column is assigned (a square matrix; with
    spare slots it would favour them). Together they save scipy ~20% of its search. scipy
    assigns the rows one at a time, each by a shortest augmenting path: rows whose cheapest
    column no other row prefers go first, as each takes its column at once, and the contested
    rows after them (another 10-15% less time on ResNet-50's largest layers).
    """
    rows, columns = matrix.shape
    cheapest = matrix.argmin(axis=1)
    contested = np.bincount(cheapest, minlength=columns)[cheapest] > 1
    order = np.concatenate((np.flatnonzero(~contested), np.flatnonzero(contested)))
    reduced = matrix.take(order, axis=0)
    reduced -= reduced[np.arange(rows), cheapest[order]][:, None]
    if rows == columns:
        reduced -= reduced.min(axis=0, keepdims=True)
    return order, reduced
