"""``SavingsReport``: the report's data (``model``) with its renderings (``render``)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from . import render
from .model import ReportData, emit


class SavingsReport(ReportData):
    """MACs and parameters before and after a conversion: totals, per layer, skipped, caveats.

    ``to_dict()`` is the complete record; ``to_json``/``to_markdown``/``to_csv``/``to_chart``
    render it, ``from_json``/``from_dict`` read it back, ``str()`` is an aligned table.
    """

    def to_markdown(self, path: str | Path | None = None) -> str:
        """The report as a Markdown document; also written to ``path`` when given.

        With a path and matplotlib installed, the per-layer chart is saved next to the document
        (``savings.md`` -> ``savings.png``) and shown in it.
        """
        chart_file = None
        if path is not None and importlib.util.find_spec("matplotlib") is not None:
            chart_path = Path(path).with_suffix(".png")
            if chart_path != Path(path):
                render.chart(self, chart_path, None)
                chart_file = chart_path.name
        return emit(render.markdown(self, chart_file), path)

    def to_csv(self, path: str | Path | None = None) -> str:
        """One CSV row per layer (converted, then skipped) and a total row."""
        return emit(render.csv_rows(self), path)

    def to_chart(self, path: str | Path, *, top: int | None = None) -> Path:
        """Save a per-layer before/after MACs bar chart (PNG, SVG or PDF, from the suffix)."""
        return render.chart(self, Path(path), top)

    def table(self, max_rows: int | None = None) -> str:
        """Aligned text table: largest savings first, totals at the bottom."""
        return render.table(self, max_rows)

    def __str__(self) -> str:
        return self.table()
