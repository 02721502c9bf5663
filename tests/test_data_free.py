"""The data-free fit's building blocks against plain references: the filter geometry (cosines
computed panel by panel as the selection reads them) and the selection (against the greedy
written out in float64). The slot assignment: test_assignment.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from ghostify.fit.assignment import assign_balanced
from ghostify.fit.geometry import FilterGeometry
from ghostify.fit.kept_filters import choose_kept, select_intrinsic
from ghostify.fit.pair_costs import pair_costs


@settings(max_examples=40, deadline=None)
@given(
    groups=st.integers(1, 3),
    per_group=st.integers(1, 9),
    length=st.integers(1, 40),
    zero=st.booleans(),
    double=st.booleans(),
    seed=st.integers(0, 2**16),
    keep=st.integers(0, 9),
)
def test_filter_geometry_matches_a_float64_reference(
    groups: int, per_group: int, length: int, zero: bool, double: bool, seed: int, keep: int
) -> None:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(groups * per_group, length, 1, 1, generator=generator)
    weight = weight.double() if double else weight
    if zero:
        weight[-1] = 0.0  # a dead filter: norm 0, cosine 0 with everything
    geometry = FilterGeometry.of(weight, groups)
    assert geometry.exact and len(geometry.cosines) == groups
    # A selection first computes some rows (a first panel, maybe more); the rest come after.
    select_intrinsic(geometry, min(keep, per_group))
    flat = weight.double().flatten(1)
    tolerance = 1e-12 if double else 1e-5
    for group in range(groups):
        rows = flat[group * per_group : (group + 1) * per_group]
        norms = rows.square().sum(dim=1)
        gram = rows @ rows.T
        scale = (norms[:, None] * norms[None, :]).clamp_min(1e-300)
        want = torch.where(scale > 1e-300, gram.square() / scale, 0.0).numpy()
        np.testing.assert_allclose(geometry.norms_sq[group], norms.numpy(), rtol=tolerance)
        every = np.arange(per_group)
        got = geometry.cosines[group].pairs(every, every)
        np.testing.assert_allclose(got, want, atol=tolerance)


def _greedy_reference(rows: torch.Tensor, keep: int) -> tuple[list[int], float]:
    """Farthest-point selection straight from its definition, in float64: the picks, sorted,
    and the smallest relative margin by which a pick beat the runner-up."""
    norms = rows.square().sum(dim=1)
    scale = (norms[:, None] * norms[None, :]).clamp_min(1e-300)
    cos_sq = (rows @ rows.T).square() / scale
    residual, picked, margin = norms.clone(), [], float("inf")
    for _ in range(keep):
        top = residual.topk(min(2, len(residual)))
        best = int(top.indices[0])
        if len(top.values) > 1 and top.values[1] >= 0:
            margin = min(margin, float((top.values[0] - top.values[1]) / norms.max()))
        picked.append(best)
        residual = torch.minimum(residual, norms * (1 - cos_sq[best]))
        residual[best] = -1.0
    return sorted(picked), margin


@settings(max_examples=60, deadline=None)
@given(
    directions=st.integers(1, 6),
    copies=st.integers(1, 30),
    loners=st.integers(0, 40),
    keep_fraction=st.floats(0.1, 0.9),
    seed=st.integers(0, 2**16),
)
def test_selection_is_the_greedy_farthest_point_selection(
    directions: int, copies: int, loners: int, keep_fraction: float, seed: int
) -> None:
    # Strong filters in a few directions (near-copies of each other) and weak filters in
    # directions of their own: once each direction has a kept filter, the greedy keeps the weak
    # ones, far down the norm order, so rows beyond the first panel are computed too.
    generator = torch.Generator().manual_seed(seed)
    length = 48
    base = torch.randn(directions, length, generator=generator, dtype=torch.float64)
    gains = 3 + torch.rand(directions * copies, 1, generator=generator, dtype=torch.float64)
    strong = base.repeat_interleave(copies, dim=0) * gains
    strong += 0.05 * torch.randn(strong.shape, generator=generator, dtype=torch.float64)
    weak = torch.randn(loners, length, generator=generator, dtype=torch.float64) * 0.5
    rows = torch.cat([strong, weak])[torch.randperm(len(strong) + loners, generator=generator)]
    keep = max(1, int(keep_fraction * len(rows)))
    want, margin = _greedy_reference(rows, keep)
    assume(margin > 1e-9)  # no near-ties: any pick among tied filters would be as good
    geometry = FilterGeometry.of(rows.view(len(rows), length, 1, 1), 1)
    assert select_intrinsic(geometry, keep).tolist() == want


@pytest.mark.parametrize(("groups", "kernel"), [(1, 3), (1, 1), (2, 3)])
def test_pair_costs_block_by_block_match_a_float64_reference(groups: int, kernel: int) -> None:
    generator = torch.Generator().manual_seed(groups * 10 + kernel)
    weight = torch.randn(48, 16 // groups, kernel, kernel, generator=generator)
    kept = choose_kept(weight, groups, 24)
    costs = pair_costs(weight, kept.geometry, kept.intrinsic, kept.ghosts, (1, 1), (1, 1), 3)
    flat = weight.double().flatten(1)
    ghosts, intrinsic = flat[kept.ghosts], flat[kept.intrinsic]
    norms_sq = ghosts.square().sum(1), intrinsic.square().sum(1)
    cos_sq = (ghosts @ intrinsic.T) ** 2 / torch.outer(*norms_sq)
    bound = norms_sq[0][:, None] * (1 - cos_sq)
    per_group = 48 // groups
    same_group = kept.ghosts[:, None] // per_group == kept.intrinsic[None, :] // per_group
    dense = costs.dense
    # Row blocks of any size give the whole matrix.
    blocks = np.concatenate([costs.rows(slice(start, start + 5)) for start in range(0, 24, 5)])
    assert np.array_equal(blocks, dense)
    fitted = np.zeros(dense.shape, dtype=bool)
    np.put_along_axis(fitted, costs.options.numpy(), True, axis=1)
    inside = same_group.numpy()
    # The scaled-copy bound where no kernel was fitted; never above it where one was.
    assert np.allclose(dense[~fitted & inside], bound.numpy()[~fitted & inside], rtol=1e-5)
    assert (dense[fitted] <= bound.numpy()[fitted] * (1 + 1e-5) + 1e-9).all()
    if kernel > 1:  # and the fitted kernels, with more taps than a scaled copy, do better
        assert fitted.any() and (dense[fitted] < bound.numpy()[fitted] * (1 - 1e-4)).mean() > 0.9
    if groups > 1:  # any pair across groups costs more than every pair inside one
        assert dense[~inside].min() > dense[inside].max()
    slots = torch.arange(24)
    assert torch.equal(assign_balanced(costs, slots), assign_balanced(costs.cost, slots))
