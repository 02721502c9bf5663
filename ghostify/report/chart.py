"""The savings chart: MACs and parameters per convolution, before and after, side by side.

Titled with the model as the user named it (its SPEC), every convolution in the model's order
(skipped ones drawn in their place, the same before and after) and one bar for everything
else, so the bars of each panel add up to the totals in the title.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError
from .model import ReportData, SkippedLayer
from .render import EVERYTHING_ELSE, human, largest_savings, model_title

SUFFIXES = (".png", ".svg", ".pdf")
_BEFORE, _AFTER, _SKIPPED = "#9aa5b1", "#2b7bba", "#d9a441"


def chart(report: ReportData, path: Path, top: int | None) -> Path:
    """Save the chart to ``path`` (.png, .svg or .pdf); ``top``: only the layers that save the
    most MACs (the rest join the "everything else" bar, so the panels still add up)."""
    try:
        from matplotlib import rc_context
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
    except ImportError:
        raise ConfigError(
            "the chart needs matplotlib: pip install 'ghostify[plot]' (or pip install matplotlib)"
        ) from None
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise ConfigError(f"chart path must end in .png, .svg or .pdf; got {str(path)!r}")
    rows = report.in_model_order() if top is None else largest_savings(report, top)
    rest = {
        key: report.totals[key] - sum(getattr(row, key) for row in rows)
        for key in ("macs_before", "macs_after", "params_before", "params_after")
    }
    labels = [row.name + (" (skipped)" if isinstance(row, SkippedLayer) else "") for row in rows]
    labels.append(EVERYTHING_ELSE if top is None else f"{EVERYTHING_ELSE} (and other layers)")
    skipped = [isinstance(row, SkippedLayer) for row in rows] + [False]
    height = max(2.8, 0.22 * len(labels) + 1.6)
    figure = Figure(figsize=(10, height), layout="constrained")
    macs_axes, params_axes = figure.subplots(1, 2, sharey=True)
    positions = list(range(len(labels)))
    for axes, unit, scale, name in (
        (macs_axes, "MACs", 1e6, "macs"),
        (params_axes, "parameters", 1e3, "params"),
    ):
        before = [getattr(row, f"{name}_before") / scale for row in rows]
        after = [getattr(row, f"{name}_after") / scale for row in rows]
        before.append(rest[f"{name}_before"] / scale)
        after.append(rest[f"{name}_after"] / scale)
        after_colours = [_SKIPPED if flag else _AFTER for flag in skipped]
        axes.barh([p - 0.2 for p in positions], before, height=0.4, color=_BEFORE)
        axes.barh([p + 0.2 for p in positions], after, height=0.4, color=after_colours)
        axes.set_xlabel(f"{unit} ({'millions' if scale == 1e6 else 'thousands'})")
        totals = report.totals
        axes.set_title(
            f"{unit}: {human(totals[f'{name}_before'])} -> {human(totals[f'{name}_after'])} "
            f"({totals[f'{name}_reduction_percent']}% fewer)",
            fontsize=9,
        )
    macs_axes.set_yticks(positions, labels, fontsize=7)
    macs_axes.invert_yaxis()  # the model's first layer on top
    figure.suptitle(f"ghostify: {model_title(report)}, layers in model order", fontsize=10)
    legend = [Patch(color=_BEFORE, label="before"), Patch(color=_AFTER, label="after")]
    if any(skipped):
        legend.append(Patch(color=_SKIPPED, label="skipped (unchanged)"))
    figure.legend(handles=legend, loc="outside lower center", ncols=len(legend), fontsize=8)
    metadata = {"Date": None} if suffix in (".svg", ".pdf") else {}  # no timestamp in the file
    # SVG text stays text (searchable, selectable), not outlines.
    with rc_context({"svg.fonttype": "none", "svg.hashsalt": "ghostify"}):
        figure.savefig(path, metadata=metadata, dpi=120)
    return path
