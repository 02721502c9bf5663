"""Which converted layers share one layout: the writers of each free channel group.

``coupling`` finds the groups; here each GhostModule writing into one is given its part: the
writers of full-size outputs of a free group are fitted together (``ghostify.fit.shared``),
which keeps one shared layout where it costs little fit; every other layer keeps its own
layout, and the record says why.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from ..fit import SharingFit
from .coupling import Coupling

SHARED, OWN = "shared", "own"


@dataclass(frozen=True)
class LayoutChoice:
    """A converted layer's layout: shared with its channel group's other writers, or its own."""

    group: int | None  # the channel group it writes into; None outside every traced graph
    layout: str  # SHARED or OWN
    reason: str


def plan_layouts(
    coupling: Coupling, layers: Iterable[str], share: bool, fitted: bool
) -> tuple[list[list[str]], dict[str, LayoutChoice]]:
    """The sets of layers to fit together (one per group), and every other layer's choice.

    ``share=False`` gives every layer its own layout (the group's order is still folded for
    one of them, the others gather into it); unfitted layers (``fitted=False``) have none yet.
    """
    names = list(layers)
    choices = {name: LayoutChoice(None, OWN, "outside every traced graph") for name in names}
    sets: list[list[str]] = []
    for group in coupling.groups:
        ghosts = [name for name in group.writers if name in choices]
        full = [name for name in ghosts if name not in group.pooled]
        for name in ghosts:
            if not group.free:
                reason = f"its channel group is pinned ({group.pins[0]}): original order"
            elif name in group.pooled:
                reason = (
                    "one value per sample and channel (after a global pool): its own layout, "
                    "gathered into the group's order at next to no cost"
                )
            elif len(full) < 2:
                reason = "the only full-size GhostModule writing into its channel group"
            elif not fitted:
                reason = "not fitted (init='scratch', or a plan's state_dict brings the layout)"
            elif not share:
                reason = "share_layouts=False"
            else:
                continue  # decided by the fit
            choices[name] = LayoutChoice(group.index, OWN, reason)
        if group.free and share and fitted and len(full) > 1:
            sets.append(full)
    return sets, choices


def record_sharing(
    sets: list[list[str]],
    outcomes: list[SharingFit],
    coupling: Coupling,
    choices: dict[str, LayoutChoice],
) -> None:
    """Each fitted set's decision, into ``choices``."""
    for members, outcome in zip(sets, outcomes, strict=True):
        group = coupling.group_of(members[0])
        index = None if group is None else group.index
        layout = SHARED if outcome.shared else OWN
        for name in members:
            choices[name] = LayoutChoice(index, layout, outcome.reason)


def shared_names(choices: dict[str, LayoutChoice]) -> frozenset[str]:
    """The layers whose layout is shared: a calibration must keep it (``fixed_layouts``)."""
    return frozenset(name for name, choice in choices.items() if choice.layout == SHARED)
