"""A budget plan for people: a table, Markdown, and the trade-off chart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .target import UNITS

# A ``BudgetPlan`` (plan.py calls into this module; typing it here would make a cycle).
BudgetPlan = Any


def _human(count: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(count) >= size:
            return f"{count / size:.2f}{unit}"
    return f"{count:g}"


def headline(plan: BudgetPlan) -> list[str]:
    """What was asked, predicted and measured, in a few lines."""
    budget, totals = plan.budget, plan.totals
    lines = [f"ghostify budget: {budget.describe()}"]
    macs = totals["macs_after"] / totals["macs_before"]
    params = totals["params_after"] / totals["params_before"]
    lines.append(
        f"plan: {len(plan.settings())} of {len(plan.layers)} layers converted; MACs "
        f"{_human(totals['macs_after'])} ({macs:.3f} of the original's), parameters "
        f"{_human(totals['params_after'])} ({params:.3f}); loss {plan.loss:.4g} "
        f"({plan.loss_source}, sensitivity {plan.sensitivity})"
    )
    if budget.kind == "speedup":
        lines.append(
            f"speed-up ({plan.runtime}, batch {plan.batch_size}, {plan.layout}): predicted "
            f"x{plan.predicted_speedup:.3f}"
            + "".join(f"; {m.what} measured x{m.speedup:.3f}" for m in plan.measurements[-1:])
        )
        if plan.timing:
            lines.append(
                f"layer forms timed: {plan.timing.get('measured', 0)}, from the cache: "
                f"{plan.timing.get('reused', 0)}"
            )
    return lines


def _rows(plan: BudgetPlan) -> list[list[str]]:
    rows = []
    for layer, pick in zip(plan.layers, plan.picks, strict=True):
        choice = layer.choices[pick]
        rows.append(
            [
                layer.name,
                choice.label,
                _human(layer.macs[0]),
                _human(layer.macs[pick]),
                f"{layer.ms[0]:.3f}" if layer.ms else "",
                f"{layer.ms[pick]:.3f}" if layer.ms else "",
                f"{layer.loss[pick]:.4g}",
            ]
        )
    return rows


HEADER = ["layer", "form", "MACs conv", "MACs chosen", "ms conv", "ms chosen", "loss"]


def table(plan: BudgetPlan) -> str:
    """The plan as an aligned text table, one row per layer decided on."""
    rows = _rows(plan)
    widths = [max(len(r[i]) for r in [HEADER, *rows]) for i in range(len(HEADER))]

    def line(cells: list[str]) -> str:
        parts = [cells[0].ljust(widths[0]), cells[1].ljust(widths[1])]
        parts += [c.rjust(w) for c, w in zip(cells[2:], widths[2:], strict=True)]
        return "  ".join(parts).rstrip()

    out = [*headline(plan), line(HEADER), "-" * len(line(HEADER)), *map(line, rows)]
    if plan.measurements:
        out.append("whole-model measurements (the original's deployed form vs the plan's):")
        out += [
            f"  {m.what}: x{m.speedup:.3f} ({m.original_ms:.2f} ms vs {m.model_ms:.2f} ms)"
            + (f", predicted x{m.predicted_speedup:.3f}" if m.predicted_speedup else "")
            for m in plan.measurements
        ]
    out += [f"  {name}: {reason}" for name, reason in plan.unconverted.items()]
    return "\n".join(out)


def markdown(plan: BudgetPlan) -> str:
    """The plan as Markdown: the headline, the per-layer table, the measurements."""
    lines = ["# ghostify budget plan", ""]
    lines += [f"- {line}" for line in headline(plan)]
    lines += ["", "| " + " | ".join(HEADER) + " |", "|---|---|" + "---:|" * (len(HEADER) - 2)]
    lines += ["| " + " | ".join(row) + " |" for row in _rows(plan)]
    if plan.measurements:
        lines += [
            "",
            "| measured | layer ms | predicted | original ms | model ms | speed-up |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {m.what} | {m.layer_ms:.2f} | "
            + (f"x{m.predicted_speedup:.3f}" if m.predicted_speedup else "")
            + f" | {m.original_ms:.2f} | {m.model_ms:.2f} | x{m.speedup:.3f} |"
            for m in plan.measurements
        ]
    return "\n".join(lines) + "\n"


def chart(plan: BudgetPlan, path: str | Path) -> Path:
    """The trade-off: every Pareto-optimal plan's loss against its predicted speed-up (or kept
    fraction of MACs / parameters), the chosen plan marked, measured plans shown."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError(
            "the budget chart needs matplotlib: pip install 'ghostify[plot]'"
        ) from None
    path = Path(path)
    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    xs = [x for x, _ in plan.frontier]
    losses = [loss for _, loss in plan.frontier]
    axes.plot(xs, losses, ".-", color="0.6", markersize=3, label="Pareto-optimal plans")
    x, loss = plan.chosen_point
    axes.plot([x], [loss], "o", color="C3", markersize=8, label="chosen")
    if plan.budget.kind == "speedup":
        axes.axvline(plan.budget.value, color="C3", linestyle=":", label="target")
        measured = [m for m in plan.measurements if m.what != "converted model"]
        if measured:
            axes.plot(
                [m.speedup for m in measured],
                [plan.loss_of_layer_ms(m.layer_ms) for m in measured],
                "x",
                color="C0",
                label="measured plans",
            )
        axes.set_xlabel(f"speed-up, predicted ({plan.runtime}, batch {plan.batch_size})")
    else:
        axes.axvline(plan.budget.value, color="C3", linestyle=":", label="budget")
        axes.set_xlabel(f"fraction of the original's {UNITS[plan.budget.kind]} kept")
    axes.set_ylabel(f"loss ({plan.loss_source}, sensitivity {plan.sensitivity})")
    axes.set_title(f"ghostify budget: {plan.budget.describe()}")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
