"""Per-layer forms of a deployed GhostModule in eager PyTorch, chosen by measurement.

A GhostModule without a kept channel order can join its two halves in more than one exact way
(``GhostModule.join``): ``"cat"`` adds the intrinsic half's folded bias and concatenates;
``"buffer"`` copies both halves into one new buffer and adds the bias on the way (one pass over
the intrinsic half fewer, and ``torch.cat``'s own allocation avoided). Which is faster depends on
the layer's shape, the memory layout and the machine, so ``deploy`` times both on each layer's
input shape through the timing database (``ghostify.timing``: interleaved, medians, cached on
disk) and keeps the faster. Only eager inference uses the choice; autograd, compilers and
exporters always see the concatenation.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..layers.ghost_module import GhostModule
from ..surgery.swap import Transaction
from ..timing import TimingDatabase, module_key

JOINS = ("cat", "buffer")


@dataclass
class JoinChoice:
    """The join kept for one GhostModule and each join's median milliseconds (when timed)."""

    join: str
    timings_ms: dict[str, float] = field(default_factory=dict)


def joinable(module: nn.Module) -> bool:
    """Whether the join of ``module`` is a choice: a GhostModule in its own channel order."""
    return isinstance(module, GhostModule) and module.channel_order is None


def input_shapes(model: nn.Module, args: tuple[Any, ...], names: list[str]) -> dict[str, tuple]:
    """The input shape each named module sees first in one forward pass of ``model``."""
    shapes: dict[str, tuple] = {}

    def keeper(name: str) -> Callable[..., None]:
        def keep(_module: nn.Module, inputs: tuple[Any, ...]) -> None:
            if name not in shapes and inputs and isinstance(inputs[0], torch.Tensor):
                shapes[name] = tuple(inputs[0].shape)

        return keep

    handles = [model.get_submodule(n).register_forward_pre_hook(keeper(n)) for n in names]
    try:
        with torch.no_grad():
            model(*args)
    finally:
        for handle in handles:
            handle.remove()
    return shapes


def choose_joins(
    model: nn.Module,
    args: tuple[Any, ...],
    layout: str,
    changes: Transaction,
    database: TimingDatabase | None = None,
) -> dict[str, JoinChoice]:
    """Time every join of every joinable GhostModule on its input shape; keep the fastest."""
    names = [name for name, module in model.named_modules() if joinable(module)]
    if not names:
        return {}
    shapes = input_shapes(model, args, names)
    weight = next(model.get_submodule(names[0]).parameters())
    database = database or TimingDatabase("eager", device=weight.device)
    choices = {}
    for name in names:
        module = model.get_submodule(name)
        if name not in shapes:  # not called on these inputs: nothing to measure
            continue
        key = module_key(module)
        forms = {f"{key}|join={join}": _builder(module, join) for join in JOINS}
        ms = database.time(forms, shapes[name], dtype=weight.dtype, layout=layout)
        timings = {join: ms[f"{key}|join={join}"] for join in JOINS}
        set_join(module, min(timings, key=timings.get), changes)
        choices[name] = JoinChoice(module.join, timings)
    return choices


def apply_join(model: nn.Module, join: str, changes: Transaction) -> dict[str, JoinChoice]:
    """Give every joinable GhostModule ``join`` (no timing)."""
    choices = {}
    for name, module in model.named_modules():
        if joinable(module):
            set_join(module, join, changes)
            choices[name] = JoinChoice(join)
    return choices


def set_join(module: GhostModule, join: str, changes: Transaction) -> None:
    """Set ``module.join``, undone if the deploy rolls back."""
    before = module.__dict__.get("join")  # None: the class default

    def undo() -> None:
        if before is None:
            module.__dict__.pop("join", None)
        else:
            module.join = before

    module.join = join
    changes.on_rollback(undo)


def _builder(module: GhostModule, join: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        form = copy.deepcopy(module)
        form.join = join
        return form

    return build
