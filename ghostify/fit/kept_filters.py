"""Which filters a layer keeps exactly: greedy farthest-point selection on their cosines."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .geometry import PANEL, FilterGeometry


def select_intrinsic(geometry: FilterGeometry, per_group: int) -> np.ndarray:
    """Choose ``per_group`` filters in each group to keep exactly; returns original indices,
    sorted.

    Greedy farthest-point selection: take the filter the current set explains worst, where a set
    explains a filter by its best scaled copy (residual ``|w|^2 (1 - max cos^2)``). This is cheap
    (one row of cosines per kept filter) and spreads the kept filters over the directions that
    matter. Ties go to the filter of larger norm, then to the lower index.
    """
    chosen: list[np.ndarray] = []
    multiply, subtract, minimum = np.multiply, np.subtract, np.minimum
    for group, cosines in enumerate(geometry.cosines):
        # At least per_group rows are read: computed as one panel (see GroupCosines).
        cosines.complete(per_group)
        cos_sq = cosines.matrix  # filters in norm order from here on
        # The loop runs once per kept filter: numpy makes each small step ~100x cheaper than
        # torch, working in the cosines' precision (no casts) another 40%.
        norms = cosines.norms_sq.take(cosines.order).astype(cos_sq.dtype)
        residual = norms.copy()
        argmax = residual.argmax
        left = np.empty_like(residual)
        picked = np.zeros(per_group, dtype=np.int64)
        for step in range(per_group):
            best = argmax()
            if best >= cosines.done:
                cosines.complete(best + PANEL)
            picked[step] = best
            # What is left of every filter g once filter ``best`` is kept: |g|^2 (1 - cos^2).
            multiply(cos_sq[best], norms, out=left)
            subtract(norms, left, out=left)
            minimum(residual, left, out=residual)
            residual[best] = -1.0  # never pick a filter twice
        kept = cosines.order.take(picked)
        kept.sort()
        chosen.append(kept + group * geometry.per_group_out)
    return np.concatenate(chosen)


@dataclass
class KeptFilters:
    """A layer's filters split into the kept ones and the ghosts, with their geometry."""

    weight: torch.Tensor
    geometry: FilterGeometry
    intrinsic: torch.Tensor  # original indices of the kept filters, sorted per group
    ghosts: torch.Tensor  # original indices of every other filter, sorted


def choose_kept(weight: torch.Tensor, groups: int, intrinsic_channels: int) -> KeptFilters:
    """Compare the filters (one Gram matrix per group) and choose the ones to keep."""
    geometry = geometry_of(weight, groups)
    return kept_from(weight, geometry, select_intrinsic(geometry, intrinsic_channels // groups))


def geometry_of(weight: torch.Tensor, groups: int) -> FilterGeometry:
    """``FilterGeometry.of(weight, groups)``, after checking the weight is finite."""
    geometry = FilterGeometry.of(weight, groups)
    # A NaN or infinite weight makes its filter's norm NaN or infinite too: checked on the
    # norms, as a pass over every weight would cost a tenth of a conversion.
    if not all(np.isfinite(norms).all() for norms in geometry.norms_sq):
        bad = int((~torch.isfinite(weight)).sum())
        what = f"{bad} NaN or infinite value(s)" if bad else "values whose squares overflow"
        raise ValueError(
            f"the weight has {what} of {weight.numel()}: the data-free fit needs finite weights "
            "(init='scratch' does not fit)"
        )
    return geometry


def kept_from(weight: torch.Tensor, geometry: FilterGeometry, intrinsic: np.ndarray) -> KeptFilters:
    """The layer's filters split at the kept ``intrinsic`` indices (sorted per group)."""
    is_ghost = np.ones(weight.shape[0], dtype=bool)
    is_ghost[intrinsic] = False
    ghosts = np.flatnonzero(is_ghost)
    return KeptFilters(
        weight,
        geometry,
        torch.from_numpy(intrinsic).to(weight.device),
        torch.from_numpy(ghosts).to(weight.device),
    )


def select_shared(
    geometries: list[FilterGeometry], per_group: int, scales: list[float]
) -> np.ndarray:
    """``select_intrinsic`` for several layers keeping filters at the same positions.

    The greedy step takes the position whose filters the kept set explains worst summed over
    the layers, each layer's residual ``|w|^2 (1 - max cos^2)`` weighted by its ``scale`` (one
    over its filters' energy: every layer counts by its relative error), then updates each
    layer's residuals with its own cosines to the new position.
    """
    chosen: list[np.ndarray] = []
    for group in range(len(geometries[0].cosines)):
        layers = [geometry.cosines[group] for geometry in geometries]
        for cosines in layers:
            # The shared picks are no layer's strongest filters: rows far down each layer's
            # norm order are read, and one product for all of them costs less than panels.
            cosines.complete(len(cosines.order))
        norms = [cosines.norms_sq * scale for cosines, scale in zip(layers, scales, strict=True)]
        residual = [layer_norms.copy() for layer_norms in norms]
        total = np.sum(residual, axis=0)
        picked = np.zeros(per_group, dtype=np.int64)
        for step in range(per_group):
            best = int(total.argmax())
            picked[step] = best
            for cosines, layer_norms, left in zip(layers, norms, residual, strict=True):
                row = int(cosines.position[best])
                cos_sq = cosines.matrix[row].take(cosines.position)  # in filter order
                np.minimum(left, layer_norms * (1.0 - cos_sq), out=left)
            np.sum(residual, axis=0, out=total)
            total[picked[: step + 1]] = -1.0  # never pick a position twice
        picked.sort()
        chosen.append(picked + group * geometries[0].per_group_out)
    return np.concatenate(chosen)
