"""With calibration data, each residual stream's shared layout is chosen again on activations.

The data-free decision (``ghostify.fit.shared.fit_group``) compares filter residuals; with data,
a calibration chooses each own layout on what the layer sees, which a data-free shared layout
cannot match: on the digits teachers of ``benchmarks/knowledge.py`` it lost up to 6.5 points of
agreement against the writers' own layouts. So before the calibration, the writers' statistics
are taken on the original model in one pass (``layer_statistics``), the shared layout is
chosen on them (``fit.shared.share_on_statistics``), and a group keeps it only where it costs
little there; the others fall back to their own layouts, which the calibration then chooses.
"""

from __future__ import annotations

import dataclasses

from ..fit.shared import share_on_statistics
from ..fit.statistics import MAX_PAIR_SUMS
from ..surgery.convert import Swapped
from ..surgery.layouts import OWN, SHARED
from .calibrate import _batchnorm_weights, _following_batchnorm, teacher_copy
from .observers import layer_statistics
from .settings import Calibration


def share_on_activations(swapped: Swapped, calibration: Calibration) -> None:
    """Decide each shared group of ``swapped`` again on the calibration data (see the module
    docstring), installing the layouts it keeps and updating ``swapped.layouts``."""
    sets = [members for members in swapped.shared_sets() if _observable(swapped, members)]
    if not sets:
        return
    teacher = teacher_copy(swapped.model, swapped.layers, swapped.originals)
    for dw_size in sorted({swapped.layers[members[0]].dw_size for members in sets}):
        chosen = [m for m in sets if swapped.layers[m[0]].dw_size == dw_size]
        names = [name for members in chosen for name in members]
        stats = layer_statistics(teacher, names, calibration, dw_size=dw_size)
        for members in chosen:
            weights = [
                _batchnorm_weights(_following_batchnorm(name, swapped.graphs, teacher))
                if calibration.weight_by_batchnorm
                else None
                for name in members
            ]
            outcome = share_on_statistics(
                [swapped.originals[name] for name in members],
                [swapped.layers[name] for name in members],
                [stats[name] for name in members],
                weights,
            )
            for name in members:
                swapped.layouts[name] = dataclasses.replace(
                    swapped.layouts[name],
                    layout=SHARED if outcome.shared else OWN,
                    reason=outcome.reason,
                )


def _observable(swapped: Swapped, members: list[str]) -> bool:
    """Whether every writer's layout can be chosen on activations: one ``dw_size``, and few
    enough channels for the pair sums (wider groups keep their data-free decision, as a
    calibration keeps such a layer's data-free layout)."""
    ghosts = [swapped.layers[name] for name in members]
    if len({ghost.dw_size for ghost in ghosts}) != 1:
        return False
    return all(
        ghost.out_channels**2 * (ghost.dw_size**ghost.dims + 1) <= MAX_PAIR_SUMS for ghost in ghosts
    )
