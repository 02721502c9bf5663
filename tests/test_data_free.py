"""The data-free fit's building blocks against plain references: the filter geometry (cosines
from a symmetric BLAS product) and the exact slot assignment (against brute force)."""

from __future__ import annotations

import itertools

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ghostify.fit.data_free import FilterGeometry, assign_balanced


@settings(max_examples=40, deadline=None)
@given(
    groups=st.integers(1, 3),
    per_group=st.integers(1, 9),
    length=st.integers(1, 40),
    zero=st.booleans(),
    double=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_filter_geometry_matches_a_float64_reference(
    groups: int, per_group: int, length: int, zero: bool, double: bool, seed: int
) -> None:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(groups * per_group, length, 1, 1, generator=generator)
    weight = weight.double() if double else weight
    if zero:
        weight[-1] = 0.0  # a dead filter: norm 0, cosine 0 with everything
    geometry = FilterGeometry.of(weight, groups)
    assert geometry.exact and len(geometry.cos_sq) == groups
    flat = weight.double().flatten(1)
    tolerance = 1e-12 if double else 1e-5
    for group in range(groups):
        rows = flat[group * per_group : (group + 1) * per_group]
        norms = rows.square().sum(dim=1)
        gram = rows @ rows.T
        scale = (norms[:, None] * norms[None, :]).clamp_min(1e-300)
        want = torch.where(scale > 1e-300, gram.square() / scale, 0.0).numpy()
        np.testing.assert_allclose(geometry.norms_sq[group], norms.numpy(), rtol=tolerance)
        np.testing.assert_allclose(geometry.cos_sq[group], want, atol=tolerance)


@settings(max_examples=80, deadline=None)
@given(
    kept=st.integers(1, 3),
    per_kept=st.integers(1, 2),
    spare=st.integers(0, 2),
    seed=st.integers(0, 2**16),
    ties=st.booleans(),
)
def test_the_slot_assignment_is_optimal(
    kept: int, per_kept: int, spare: int, seed: int, ties: bool
) -> None:
    # ``spare`` slots more than ghosts, as when out_channels is not a multiple of the ratio.
    rng = np.random.default_rng(seed)
    slots = kept * per_kept
    n = max(1, slots - spare)
    cost = rng.random((n, kept))
    if ties:  # few distinct values: many optimal assignments
        cost = np.round(cost * 3)
    slot_source = torch.from_numpy(rng.permutation(np.repeat(np.arange(kept), per_kept)))
    slot = assign_balanced(torch.from_numpy(cost), slot_source).numpy()
    assert len(set(slot)) == n and all(0 <= j < slots for j in slot)  # one ghost per slot
    source = slot_source.numpy()
    got = cost[np.arange(n), source[slot]].sum()
    best = min(
        cost[np.arange(n), source[list(order)]].sum()
        for order in itertools.permutations(range(slots), n)
    )
    assert got <= best + 1e-9
