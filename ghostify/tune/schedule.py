"""The order of a stage-wise calibration: which graphs to propagate, which layers go per layer.

From one hooked run of the first batch (the execution order and call counts of every converted
layer, BatchNorm and traced submodule):

- a model traced as a whole is one segment; otherwise every traced submodule called once per
  forward is a segment, reached by running the model up to it (``propagate.py`` then works
  inside it);
- inside a segment, a converted layer with one call site, called once, is fitted there (``FIT``);
  a BatchNorm to re-estimate with one call site is re-estimated there from the student's values
  (``PREPARE``); a module called at several places is fitted or re-estimated by the per-layer
  path at its first call site (``PREPARE``, in ``fallback`` with the reason);
- converted layers and BatchNorms outside every segment take the per-layer path (run the whole
  model for their inputs) at their place in the execution order.

BatchNorms are re-estimated when they first run after the first converted layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..layers.ghost_module import GhostModule
from ..surgery.graph import TracedGraph
from .propagate import FIT, PREPARE


@dataclass
class Segment:
    """A traced graph propagated as a whole; its root runs at ``position`` (-1: the model)."""

    traced: TracedGraph
    position: int


@dataclass
class Fallback:
    """A converted layer (``fit``) or BatchNorm (``batchnorm``) on the per-layer path."""

    name: str
    kind: str
    position: int


@dataclass
class Schedule:
    steps: list[Segment | Fallback] = field(default_factory=list)
    roles: dict[str, str] = field(default_factory=dict)  # inside segments: FIT or PREPARE
    fallback: dict[str, str] = field(default_factory=dict)  # name -> why the per-layer path
    batchnorms: list[str] = field(default_factory=list)  # to re-estimate, in order
    calls: dict[str, int] = field(default_factory=dict)
    shapes: dict[str, CallShape] = field(default_factory=dict)
    never_ran: list[str] = field(default_factory=list)  # converted layers the data never reached


def batchnorms_of(model: nn.Module) -> dict[str, nn.Module]:
    """BatchNorms with running statistics, by (first) name."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is not None
    }


@dataclass(frozen=True)
class CallShape:
    """A module's first call on the first batch: bytes in and out, output positions."""

    input_bytes: int
    output_bytes: int
    positions: int  # spatial size of the output (1 for a non-tensor output)


def first_calls(
    model: nn.Module, inputs: torch.Tensor, modules: dict[str, nn.Module]
) -> tuple[list[str], dict[str, int], dict[str, CallShape]]:
    """Names of ``modules`` in the order they first run on ``inputs``, their call counts and
    the shape of their first call."""
    order: list[str] = []
    calls: dict[str, int] = {}
    shapes: dict[str, CallShape] = {}
    names = {id(module): name for name, module in reversed(list(modules.items()))}

    def hook(module: nn.Module, _args: Any) -> None:
        name = names[id(module)]
        if name not in calls:
            order.append(name)
        calls[name] = calls.get(name, 0) + 1

    def measure(module: nn.Module, args: tuple, output: Any) -> None:
        name = names[id(module)]
        if name in shapes or not args or not isinstance(args[0], torch.Tensor):
            return
        out = output if isinstance(output, torch.Tensor) else None
        shapes[name] = CallShape(
            args[0].nbytes,
            0 if out is None else out.nbytes,
            1 if out is None or out.dim() < 3 else out[0, 0].numel(),
        )

    unique = {id(m): m for m in modules.values()}.values()
    handles = [m.register_forward_pre_hook(hook) for m in unique]
    handles += [m.register_forward_hook(measure) for m in unique]
    try:
        with torch.no_grad():
            model(inputs)
    finally:
        for handle in handles:
            handle.remove()
    return order, calls, shapes


def build_schedule(
    model: nn.Module,
    inputs: torch.Tensor,
    ghosts: dict[str, GhostModule],
    graphs: list[TracedGraph],
    *,
    reestimate: bool,
    stagewise: bool,
) -> Schedule:
    """The steps of a calibration of ``model`` (eval mode) on batches like ``inputs``."""
    batchnorms = batchnorms_of(model)
    roots = {t.prefix[:-1]: t for t in graphs if t.prefix} if stagewise else {}
    watched: dict[str, nn.Module] = {**ghosts, **batchnorms}
    watched.update({name: model.get_submodule(name) for name in roots})
    order, calls, shapes = first_calls(model, inputs, watched)
    position = {name: i for i, name in enumerate(order)}
    schedule = Schedule(calls=calls, shapes=shapes)
    schedule.never_ran = [name for name in ghosts if name not in calls]
    first_ghost = min((position[n] for n in ghosts if n in position), default=len(order))
    if reestimate:
        schedule.batchnorms = [
            n for n in order if n in batchnorms and n not in ghosts and position[n] > first_ghost
        ]
    units = [n for n in order if n in ghosts] + schedule.batchnorms
    segments: list[Segment] = []
    whole = next((t for t in graphs if not t.prefix), None) if stagewise else None
    if whole is not None:
        segments.append(Segment(whole, -1))
    else:
        segments += [
            Segment(traced, position[name])
            for name, traced in roots.items()
            if calls.get(name) == 1
        ]
    # A graph holding no layer of interest is not propagated (a traced BatchNorm alone, say).
    segments = [s for s in segments if any(s.traced.call_sites(n) for n in units)]
    covered: set[str] = set()
    for segment in segments:
        for name in units:
            sites = segment.traced.call_sites(name)
            if not sites:
                continue
            covered.add(name)
            if len(sites) == 1 and calls[name] == 1:
                schedule.roles[name] = FIT if name in ghosts else PREPARE
            else:
                schedule.roles[name] = PREPARE
                schedule.fallback[name] = (
                    f"called {calls[name]} times per forward"
                    if calls[name] > 1
                    else f"{len(sites)} call sites"
                )
    steps: list[Segment | Fallback] = list(segments)
    for name in units:
        if name not in covered:
            kind = "fit" if name in ghosts else "batchnorm"
            schedule.fallback[name] = (
                "outside the traced graphs" if stagewise else "stagewise=False"
            )
            steps.append(Fallback(name, kind, position[name]))
    schedule.steps = sorted(steps, key=lambda step: step.position)
    return schedule
