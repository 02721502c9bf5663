"""``SavingsReport``: the report's data (``model``) with its renderings (``render``)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from . import render
from .chart import chart
from .markdown import markdown
from .model import ReportData, emit


class SavingsReport(ReportData):
    """MACs and parameters before and after a conversion: totals, per layer, skipped, caveats.

    ``to_dict()`` is the complete record; ``to_json``/``to_markdown``/``to_csv``/``to_chart``
    render it, ``from_json``/``from_dict`` read it back, ``str()`` is an aligned table.
    """

    def to_markdown(self, path: str | Path | None = None) -> str:
        """The report as a Markdown document; also written to ``path`` when given.

        With a path, the conversion plan is written beside the document as JSON
        (``savings.md`` -> ``savings.plan.json``) and linked from it, and with matplotlib
        installed the chart too (``savings.png``), shown in it.
        """
        chart_file = plan_file = None
        if path is not None:
            path = Path(path)
            plan_path = path.with_name(f"{path.stem}.plan.json")
            emit(json.dumps(self.provenance.get("plan"), indent=1) + "\n", plan_path)
            plan_file = plan_path.name
            chart_path = path.with_suffix(".png")
            if chart_path != path and importlib.util.find_spec("matplotlib") is not None:
                chart(self, chart_path, None)
                chart_file = chart_path.name
        return emit(markdown(self, chart_file, plan_file), path)

    def to_csv(self, path: str | Path | None = None) -> str:
        """One CSV row per convolution in the model's order, one for the rest of the model and a
        total row."""
        return emit(render.csv_rows(self), path)

    def to_chart(self, path: str | Path, *, top: int | None = None) -> Path:
        """Save the per-convolution before/after chart of MACs and parameters (PNG, SVG or PDF,
        from the suffix); ``top``: only the layers that save the most."""
        return chart(self, Path(path), top)

    def table(self, max_rows: int | None = None) -> str:
        """Aligned text table in the model's order, the rest of the model, the totals at the
        bottom; ``max_rows``: only the rows that save the most."""
        return render.table(self, max_rows)

    def __str__(self) -> str:
        return self.table()
