"""Speed-up budgets: measure whole plans, and tighten until the measurement meets the target.

A plan is built as the conversion would build it (a deep copy of the model, data-free fitted, so
every layer's channel order is kept or folded as in the real conversion), deployed
(``ghostify.deploy``: BatchNorms folded, the faster memory layout), and timed interleaved with the
original's own deployed form in the budget's runtime. The time model (``latency.TimeModel``) is
refitted on every measurement; the next plan is the lowest-loss one predicted to meet the target,
kept strictly between the slowest plan measured to meet it and the fastest measured to miss it.
A plan is accepted only once measured; the fastest plan (every layer in its fastest form) is
measured first, so a target it meets always ends with a plan measured to meet it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..deploy import deploy, deploy_record
from ..errors import ConfigError
from ..surgery.convert import convert as convert_pass
from ..surgery.discovery import ConvSite
from ..surgery.record import LayerSettings
from ..surgery.selection import Selection
from .choices import LayerOptions
from .latency import TimeModel, time_models
from .plan import Measurement
from .solver import Frontier

# Plans are aimed this much above the target and accepted this much above it, so that the
# converted model, measured again afterwards, still meets it through the timing noise.
AIM_MARGIN = 0.02
ACCEPT_MARGIN = 0.01
# Stop refining once an accepted plan measures within this of the target.
CLOSE_ENOUGH = 0.03


def chooser(
    layers: list[LayerOptions], picks: list[int], reason: str
) -> Callable[[ConvSite, LayerSettings], LayerSettings | str]:
    """A ``choose=`` for the conversion pass applying ``picks`` (``reason`` for kept layers)."""
    chosen = {layer.name: layer.choices[pick] for layer, pick in zip(layers, picks, strict=True)}

    def choose(site: ConvSite, settings: LayerSettings) -> LayerSettings | str:
        choice = chosen.get(site.name)
        if choice is None or choice.keep:
            return reason
        return choice.settings  # type: ignore[return-value]

    return choose


def deployed(model: nn.Module, args: tuple[Any, ...]) -> nn.Module:
    """A deployed copy of ``model`` (eval mode, BatchNorms folded, its faster layout)."""
    return deploy(copy.deepcopy(model).eval(), args)


def build_plan(
    model: nn.Module,
    select: Selection,
    args: tuple[Any, ...],
    layers: list[LayerOptions],
    picks: list[int],
) -> nn.Module:
    """``model`` converted (data-free, on a copy) as ``picks`` say, then deployed."""
    candidate = copy.deepcopy(model)
    convert_pass(
        candidate,
        select=select,
        example_inputs=args,
        choose=chooser(layers, picks, "kept (budget plan)"),
        keep_originals=False,
        progress=False,
    )
    return deploy(candidate.eval(), args)


@dataclass
class SpeedSearch:
    """The measured search for a plan meeting a speed-up target (see the module docstring)."""

    model: nn.Module
    select: Selection
    args: tuple[Any, ...]
    runtime: str
    layers: list[LayerOptions]
    frontier: Frontier
    target: float
    original: nn.Module  # the original, deployed
    time_model: TimeModel
    measurements: list[Measurement] = field(default_factory=list)

    def layout(self) -> str:
        record = deploy_record(self.original)
        return record.memory_format if record is not None else "contiguous"

    def measure(self, picks: list[int], what: str) -> Measurement:
        layer_ms = sum(layer.ms[p] for layer, p in zip(self.layers, picks, strict=True))
        predicted = (
            1.0 / self.time_model.ratio(layer_ms) if len(self.time_model.points) > 1 else None
        )
        candidate = build_plan(self.model, self.select, self.args, self.layers, picks)
        original_ms, model_ms = time_models([self.original, candidate], self.args, self.runtime)
        measurement = Measurement(what, layer_ms, predicted, original_ms, model_ms)
        self.time_model.add(layer_ms, model_ms / original_ms)
        self.measurements.append(measurement)
        return measurement

    def run(self, rounds: int, describe: str) -> list[int]:
        """The lowest-loss plan measured to meet the target within ``rounds`` measurements after
        the fastest plan's; a ConfigError (nothing changed) when even that misses it."""
        fastest = [min(range(len(layer.ms)), key=layer.ms.__getitem__) for layer in self.layers]
        first = self.measure(fastest, "fastest plan")
        accept = self.target * (1 + ACCEPT_MARGIN)
        if first.speedup < accept:
            raise ConfigError(
                f"{describe} cannot be met here: the fastest plan (every layer in its fastest "
                f"form) measured x{first.speedup:.3f} against the original's deployed form "
                f"({self.runtime}, input {_shapes(self.args)}); ask for speedup <= "
                f"{first.speedup / (1 + ACCEPT_MARGIN):.2f}, or allow more layers or larger "
                "ratios"
            )
        best, lower, upper = fastest, first.layer_ms, float("inf")
        measured = {tuple(fastest)}
        for round_index in range(rounds):
            limit = self.time_model.layer_limit(self.target * (1 + AIM_MARGIN))
            if not lower < limit < upper:  # the model's guess is outside what was measured
                top = upper if upper < float("inf") else float(self.frontier.cost[-1])
                limit = (lower + top) / 2
            index = self.frontier.best_within(limit)
            if index is None or float(self.frontier.cost[index]) <= lower:
                break
            picks = self.frontier.plan(index)
            if tuple(picks) in measured:
                break
            measured.add(tuple(picks))
            result = self.measure(picks, f"round {round_index + 1}")
            if result.speedup >= accept:
                best, lower = picks, result.layer_ms
                if result.speedup <= self.target * (1 + CLOSE_ENOUGH):
                    break
            else:
                upper = result.layer_ms
        return best


def _shapes(args: tuple[Any, ...]) -> str:
    return ", ".join("x".join(map(str, a.shape)) for a in args if hasattr(a, "shape"))
