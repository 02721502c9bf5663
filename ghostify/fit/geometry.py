"""How a layer's filters relate: their norms and squared cosines, group by group.

The cosines are all the selection of the kept filters, the similarity search and the first cost
estimates need; their rows are computed as the selection reads them (``GroupCosines``), through
a seeded random projection for very long filters.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from .kernels import as_float

_SKETCH_DIM = 512
# Rows of the cosine matrix computed at once past the first panel (see GroupCosines).
PANEL = 16


@lru_cache(maxsize=2)
def _sketch(length: int, dtype: torch.dtype) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(length, _SKETCH_DIM, generator=generator, dtype=dtype)


def _working_rows(rows: torch.Tensor) -> torch.Tensor:
    """The filters as float rows for similarity search (half precision is too coarse).

    The Gram matrix of ``r`` filters of length ``d`` costs ``r^2 d / 2`` multiply-adds. When
    ``r`` is large and ``d`` very long, projecting onto ``_SKETCH_DIM`` fixed random directions
    first is cheaper and keeps inner products, norms and cosines up to a few percent
    (Johnson-Lindenstrauss); otherwise the exact filters are compared. The projection is seeded,
    so conversions stay deterministic; the least-squares fits always use the exact filters.
    """
    rows = as_float(rows)
    count, length = rows.shape
    sketched_cost = count * length * _SKETCH_DIM + count * count * _SKETCH_DIM // 2
    if length <= _SKETCH_DIM or sketched_cost >= count * count * length // 2:
        return rows
    return rows @ _sketch(length, rows.dtype).to(rows.device) / _SKETCH_DIM**0.5


class GroupCosines:
    """Squared cosines between one group's filters, row by row as the selection needs them.

    Keeping ``k`` of ``r`` filters reads only the kept filters' rows (the selection, then the
    pair costs), so the matrix is computed in row panels, the filters in decreasing norm order:
    the greedy selection picks strong filters first (on randomly initialised ResNet-50 its
    ``k = r/2`` picks lie within the first 52-57% of that order). The first panel, rows
    ``[0, k)``, is one symmetric product (BLAS ``syrk``) for its square block and one general
    product for the rest of its rows. A pick further down the order adds a panel up to it (and
    ``PANEL`` rows more), computed against the columns not covered yet and completed from the
    panels before (the matrix is symmetric). For ``k = r/2`` that is 3/8 of ``r^2`` products
    instead of the 1/2 of one ``syrk`` over all rows: 0.6-0.7 of its time, the general product
    being the faster. ``position[f]`` is filter ``f``'s row; rows ``[0, done)`` of ``matrix``
    are complete.
    """

    def __init__(self, rows: torch.Tensor) -> None:
        norms = torch.linalg.vector_norm(rows, dim=1)  # 10x faster than in float64
        self.norms_sq = np.square(norms.cpu().numpy(), dtype=np.float64)  # filter order
        self.order = np.argsort(-self.norms_sq, kind="stable")
        self.position = np.empty_like(self.order)
        self.position[self.order] = np.arange(len(self.order))
        # 1 / sqrt in float64 is what torch's rsqrt computes: the same unit rows to the last bit.
        inverse = np.zeros_like(self.norms_sq)
        np.divide(1.0, np.sqrt(self.norms_sq), out=inverse, where=self.norms_sq > 0)
        if rows.device.type != "cpu":  # one product on the accelerator, all rows at once
            index = torch.from_numpy(self.order).to(rows.device)
            scale = torch.from_numpy(inverse[self.order]).to(rows.device, rows.dtype)
            unit = rows.index_select(0, index) * scale[:, None]
            self.matrix = (unit @ unit.T).square_().cpu().numpy()
            self.done = len(self.order)  # every row: complete() has nothing left to do
            return
        unit = rows.numpy().take(self.order, axis=0)
        unit *= inverse.astype(unit.dtype).take(self.order)[:, None]
        self.unit = unit
        self.matrix = np.empty((len(unit), len(unit)), dtype=unit.dtype)
        self.done = 0

    def complete(self, count: int) -> None:
        """Make rows ``[0, count)`` complete: one panel of rows ``[done, count)``."""
        start, stop = self.done, min(count, len(self.order))
        if stop <= start:
            return
        unit, matrix = self.unit, self.matrix
        panel = unit[start:stop]
        np.matmul(panel, panel.T, out=matrix[start:stop, start:stop])  # syrk
        np.matmul(panel, unit[stop:].T, out=matrix[start:stop, stop:])
        np.square(matrix[start:stop, start:], out=matrix[start:stop, start:])
        matrix[start:stop, :start] = matrix[:start, start:stop].T
        self.done = stop

    def pairs(self, filters: np.ndarray, kept: np.ndarray) -> np.ndarray:
        """The squared cosines of ``filters`` with the filters ``kept``, as a
        ``(len(filters), len(kept))`` array: read from the kept filters' rows, the ones the
        selection computed."""
        at = self.position.take(kept)
        if len(at):
            self.complete(int(at.max()) + 1)
        where = self.position.take(filters)
        # torch: two gathers and a blocked transpose, each one call that frees the GIL (numpy
        # took 1.3x the time, in strips of a few rows holding the GIL between them).
        rows = torch.from_numpy(self.matrix).index_select(0, torch.from_numpy(at))
        return rows.index_select(1, torch.from_numpy(where)).T.contiguous().numpy()


@dataclass
class FilterGeometry:
    """Squared norms and squared cosines of a layer's filters, group by group.

    The cosines are all the selection, the similarity search and the first cost estimates need;
    their rows are computed as the selection reads them (``GroupCosines``).
    """

    per_group_out: int
    cosines: list[GroupCosines]
    exact: bool  # False when some group was compared through a random projection

    @property
    def norms_sq(self) -> list[np.ndarray]:
        """Per group, the filters' squared norms ``(per_group_out,)``, float64."""
        return [group.norms_sq for group in self.cosines]

    @classmethod
    def of(cls, weight: torch.Tensor, groups: int) -> FilterGeometry:
        flat = weight.reshape(weight.shape[0], -1)
        per_group_out = weight.shape[0] // groups
        cosines, exact = [], True
        for group in range(groups):
            group_rows = flat[group * per_group_out : (group + 1) * per_group_out]
            rows = _working_rows(group_rows)
            exact = exact and rows.shape[1] == group_rows.shape[1]
            cosines.append(GroupCosines(rows))
        return cls(per_group_out, cosines, exact)
