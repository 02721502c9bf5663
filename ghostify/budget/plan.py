"""``BudgetPlan``: the form chosen for every layer under a budget, what it was predicted to cost
and lose, what was measured, and the other plans it was chosen among."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..surgery.discovery import ConvSite
from ..surgery.record import LayerSettings
from .choices import Choice, LayerOptions
from .target import Budget

SCHEMA = "ghostify.budget/1"


@dataclass
class Measurement:
    """One whole-model timing: a plan's deployed model against the original's, interleaved."""

    what: str  # "fastest plan", "round 1", "converted model", ...
    layer_ms: float  # the plan's sum of layer times (the time table's view)
    predicted_speedup: float | None  # from the time model before this measurement
    original_ms: float
    model_ms: float

    @property
    def speedup(self) -> float:
        return self.original_ms / self.model_ms

    def to_dict(self) -> dict[str, Any]:
        return {
            "what": self.what,
            "layer_ms": round(self.layer_ms, 4),
            "predicted_speedup": None
            if self.predicted_speedup is None
            else round(self.predicted_speedup, 4),
            "original_ms": round(self.original_ms, 4),
            "model_ms": round(self.model_ms, 4),
            "speedup": round(self.speedup, 4),
        }


@dataclass
class BudgetPlan:
    """What ``plan_budget`` decided (``convert(model, budget=...)`` applies it).

    ``layers``: every layer the budget decided on, with its forms' costs, times and losses;
    ``picks``: the chosen form's index per layer. ``totals``: MACs and parameters of the original
    and (predicted, exactly as fvcore counts them) of the result. ``loss``: the chosen plan's
    total weighted loss. ``frontier``: Pareto-optimal plans (up to a few hundred, evenly spread) as
    (predicted speed-up or kept fraction of MACs / parameters, loss): the trade-off the choice was
    made on (``chosen_point``). ``measurements``: whole-model timings (speed-up
    budgets). ``unconverted``: layers the budget could not consider, with the reason.
    """

    budget: Budget
    layers: list[LayerOptions]
    picks: list[int]
    totals: dict[str, int]
    loss: float
    loss_source: str  # "data-free" or "calibration"
    sensitivity: str
    weights: dict[str, float]
    frontier: list[tuple[float, float]] = field(default_factory=list)  # (x, loss), x as charted
    cost_unit: str = "MACs"
    exact: bool = True
    predicted_speedup: float | None = None
    measurements: list[Measurement] = field(default_factory=list)
    unconverted: dict[str, str] = field(default_factory=dict)
    runtime: str | None = None
    batch_size: int | None = None
    layout: str | None = None
    timing: dict[str, int] = field(default_factory=dict)  # layer forms timed / from the cache
    seconds: dict[str, float] = field(default_factory=dict)  # time spent per planning stage
    # Speed-up budgets, until the converted model is measured: the original deployed, the
    # inputs it is timed on.
    original_deployed: Any = field(default=None, repr=False)
    example_args: tuple[Any, ...] = field(default=(), repr=False)
    time_model: Any = field(default=None, repr=False)
    # The loss of each plan measured, by its sum of layer times (for the chart).
    measured_losses: dict[float, float] = field(default_factory=dict, repr=False)

    # -- what convert applies ----------------------------------------------------------------

    def choice(self, name: str) -> Choice | None:
        for layer, pick in zip(self.layers, self.picks, strict=True):
            if layer.name == name:
                return layer.choices[pick]
        return None

    def settings(self) -> dict[str, LayerSettings]:
        """The GhostModule settings of every layer the plan converts."""
        return {
            layer.name: layer.choices[pick].settings  # type: ignore[misc]
            for layer, pick in zip(self.layers, self.picks, strict=True)
            if not layer.choices[pick].keep
        }

    def choose(self, site: ConvSite, settings: LayerSettings) -> LayerSettings | str:
        """The conversion pass's per-layer decision (``surgery.convert``'s ``choose=``)."""
        del settings  # the plan's own settings replace the rules' global ones
        if site.name in self.unconverted:
            return self.unconverted[site.name]
        choice = self.choice(site.name)
        if choice is None:
            return (
                f"not planned by the budget ({self.budget.describe()}): the layer was not "
                "among those the budget was solved for"
            )
        if choice.keep:
            return f"kept as a convolution by the budget ({self.budget.describe()})"
        return choice.settings  # type: ignore[return-value]

    # -- what it predicts and measured -------------------------------------------------------

    @property
    def chosen_point(self) -> tuple[float, float]:
        """The chosen plan as (x, loss), x as in ``frontier``."""
        if self.budget.kind == "speedup":
            x = self.predicted_speedup or 1.0
        else:
            kind = self.budget.kind
            x = self.totals[f"{kind}_after"] / self.totals[f"{kind}_before"]
        return (float(x), float(self.loss))

    @property
    def measured_speedup(self) -> float | None:
        """The last whole-model measurement's speed-up (the converted model's when taken)."""
        return self.measurements[-1].speedup if self.measurements else None

    def summary(self) -> dict[str, Any]:
        """The plan in a few figures (kept in the conversion record's options)."""
        totals = self.totals
        return {
            "schema": SCHEMA,
            "budget": self.budget.to_dict(),
            "loss": round(self.loss, 6),
            "loss_source": self.loss_source,
            "sensitivity": self.sensitivity,
            "macs_fraction": round(totals["macs_after"] / totals["macs_before"], 6)
            if totals.get("macs_before")
            else None,
            "params_fraction": round(totals["params_after"] / totals["params_before"], 6)
            if totals.get("params_before")
            else None,
            "predicted_speedup": None
            if self.predicted_speedup is None
            else round(self.predicted_speedup, 4),
            "measured_speedup": None
            if self.measured_speedup is None
            else round(self.measured_speedup, 4),
            "runtime": self.runtime,
            "batch_size": self.batch_size,
            "converted": len(self.settings()),
            "kept": len(self.layers) - len(self.settings()),
            "exact": self.exact,
        }

    def loss_of_layer_ms(self, layer_ms: float) -> float | None:
        """The loss of the measured plan whose layer times add up to ``layer_ms``."""
        return self.measured_losses.get(round(layer_ms, 9))

    def table(self) -> str:
        from .render import table

        return table(self)

    def __str__(self) -> str:
        return self.table()

    def to_markdown(self) -> str:
        from .render import markdown

        return markdown(self)

    def to_json(self, path: str | Path | None = None) -> str:
        """``to_dict()`` as JSON text; written to ``path`` too when given."""
        text = json.dumps(self.to_dict(), indent=1)
        if path is not None:
            Path(path).write_text(text, encoding="utf-8")
        return text

    def to_chart(self, path: str | Path) -> Path:
        """The trade-off chart (matplotlib), as a PNG at ``path``."""
        from .render import chart

        return chart(self, path)

    def to_dict(self) -> dict[str, Any]:
        """Everything, as plain data: per layer every form's costs, times and losses."""
        rows = []
        for layer, pick in zip(self.layers, self.picks, strict=True):
            rows.append(
                {
                    "name": layer.name,
                    "chosen": layer.choices[pick].label,
                    "weight": self.weights.get(layer.name),
                    "forms": [
                        {
                            "form": choice.label,
                            "macs": layer.macs[i],
                            "params": layer.params[i],
                            "ms": round(layer.ms[i], 5) if layer.ms else None,
                            "loss": layer.loss[i] if layer.loss else None,
                        }
                        for i, choice in enumerate(layer.choices)
                    ],
                }
            )
        return {
            **self.summary(),
            "totals": dict(self.totals),
            "runtime": self.runtime,
            "batch_size": self.batch_size,
            "layout": self.layout,
            "cost_unit": self.cost_unit,
            "timing": dict(self.timing),
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
            "measurements": [m.to_dict() for m in self.measurements],
            "frontier": [[float(c), float(loss)] for c, loss in self.frontier],
            "chosen_point": list(self.chosen_point),
            "unconverted": dict(self.unconverted),
            "layers": rows,
        }
