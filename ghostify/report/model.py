"""The savings report's data: per-layer rows, totals, caveats, and its JSON form."""

from __future__ import annotations

import copy
import importlib.util
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from . import render

SCHEMA = "ghostify.report/1"


@dataclass(frozen=True)
class LayerSaving:
    """One converted layer: its original configuration, ghost settings and both counts."""

    name: str
    in_channels: int
    out_channels: int
    kernel_size: list[int]
    stride: list[int]
    padding: list[int] | str
    dilation: list[int]
    groups: int
    bias: bool
    ratio: int
    dw_size: int
    intrinsic_channels: int
    output_shape: list[int] | None  # of the first call; None when the forward never called it
    calls: int
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    aliases: list[str] = field(default_factory=list)  # other names of a shared module
    dims: int = 2  # spatial dimensions: 1 (Conv1d), 2 (Conv2d) or 3 (Conv3d)
    primary_type: str = "Conv2d"  # class of the primary layer: the original's own kind
    # Median time of one call, measured with report(..., latency=True); None when not measured.
    original_ms: float | None = None
    ghost_ms: float | None = None
    # Calibrated conversions: the fit method and relative output error on the calibration data.
    fit_method: str | None = None
    fit_error: float | None = None

    @property
    def macs_saved(self) -> int:
        return self.macs_before - self.macs_after

    @property
    def params_saved(self) -> int:
        return self.params_before - self.params_after


@dataclass(frozen=True)
class SkippedLayer:
    """A convolution left as it was, why, and what it costs (the same before and after)."""

    name: str
    reason: str
    in_channels: int | None
    out_channels: int | None
    kernel_size: list[int] | None
    stride: list[int] | None
    groups: int | None
    macs: int
    params: int


@dataclass
class SavingsReport:
    """MACs and parameters before and after a conversion: totals, per layer, skipped, caveats.

    ``to_dict()`` is the complete record; ``to_json``/``to_markdown``/``to_csv``/``to_chart``
    render it, ``from_json``/``from_dict`` read it back, ``str()`` is an aligned table.
    """

    totals: dict[str, Any]
    layers: list[LayerSaving]
    skipped: list[SkippedLayer]
    conventions: dict[str, Any]
    cross_check: dict[str, Any]
    provenance: dict[str, Any]
    schema: str = SCHEMA

    # -- serialisation -------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The whole report as plain JSON-able data."""
        return {
            "schema": self.schema,
            "totals": copy.deepcopy(self.totals),
            "layers": [asdict(row) for row in self.layers],
            "skipped": [asdict(row) for row in self.skipped],
            "conventions": copy.deepcopy(self.conventions),
            "cross_check": copy.deepcopy(self.cross_check),
            "provenance": copy.deepcopy(self.provenance),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SavingsReport:
        """Rebuild a report from ``to_dict()`` output (for example a loaded JSON file)."""
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            got = data.get("schema") if isinstance(data, dict) else type(data).__name__
            raise ConfigError(f"not a ghostify report: expected schema {SCHEMA!r}, got {got!r}")
        try:
            return cls(
                totals=data["totals"],
                layers=[_row(LayerSaving, row) for row in data["layers"]],
                skipped=[_row(SkippedLayer, row) for row in data["skipped"]],
                conventions=data["conventions"],
                cross_check=data["cross_check"],
                provenance=data["provenance"],
            )
        except (KeyError, TypeError) as error:
            raise ConfigError(f"malformed ghostify report: {error}") from None

    def to_json(self, path: str | Path | None = None) -> str:
        """The report as indented JSON; also written to ``path`` when given."""
        return _emit(_dumps(self.to_dict()) + "\n", path)

    @classmethod
    def from_json(cls, source: str | Path) -> SavingsReport:
        """Read a report from a JSON string or from the path of a JSON file."""
        text = str(source)
        if not text.lstrip().startswith("{"):
            text = Path(source).read_text(encoding="utf-8")
        return cls.from_dict(json.loads(text))

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
        return _emit(render.markdown(self, chart_file), path)

    def to_csv(self, path: str | Path | None = None) -> str:
        """One CSV row per layer (converted, then skipped) and a total row."""
        return _emit(render.csv_rows(self), path)

    def to_chart(self, path: str | Path, *, top: int | None = None) -> Path:
        """Save a per-layer before/after MACs bar chart (PNG, SVG or PDF, from the suffix)."""
        return render.chart(self, Path(path), top)

    def table(self, max_rows: int | None = None) -> str:
        """Aligned text table: largest savings first, totals at the bottom."""
        return render.table(self, max_rows)

    def __str__(self) -> str:
        return self.table()


def _row(cls: type, row: dict[str, Any]) -> Any:
    names = {f.name for f in fields(cls)}
    return cls(**{key: value for key, value in row.items() if key in names})


def _dumps(value: Any, indent: str = "") -> str:
    """Indented JSON, with lists of plain values (shapes, kernel sizes) kept on one line."""
    inner = indent + "  "
    if isinstance(value, dict) and value:
        items = [f"{inner}{json.dumps(str(k))}: {_dumps(v, inner)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + indent + "}"
    if isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        return "[\n" + ",\n".join(inner + _dumps(v, inner) for v in value) + "\n" + indent + "]"
    return json.dumps(value)


def _emit(text: str, path: str | Path | None) -> str:
    if path is not None:
        Path(path).write_text(text, encoding="utf-8", newline="")
    return text
