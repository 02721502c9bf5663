"""The savings report's data: per-layer rows, totals, caveats, and its JSON form."""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

from ..errors import ConfigError

SCHEMA = "ghostify.report/1"
_Report = TypeVar("_Report", bound="ReportData")


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
    # Place among the model's convolutions in the order the model defines them (None: unknown,
    # in reports written before it was recorded).
    position: int | None = None

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
    position: int | None = None  # as LayerSaving.position

    # The same figures under LayerSaving's names: a skipped layer costs the same before and after.
    @property
    def macs_before(self) -> int:
        return self.macs

    @property
    def macs_after(self) -> int:
        return self.macs

    @property
    def params_before(self) -> int:
        return self.params

    @property
    def params_after(self) -> int:
        return self.params


@dataclass
class ReportData:
    """The savings report's data and its JSON form; ``SavingsReport`` adds the renderings.

    ``to_dict()`` is the complete record; ``from_json``/``from_dict`` read it back.
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
    def from_dict(cls: type[_Report], data: dict[str, Any]) -> _Report:
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

    def in_model_order(self) -> list[LayerSaving | SkippedLayer]:
        """Every convolution, converted or skipped, in the order the model defines them: the
        one order of every table and chart."""
        rows: list[LayerSaving | SkippedLayer] = [*self.layers, *self.skipped]
        last = len(rows)  # rows of older reports, without positions, keep their listed order
        return sorted(rows, key=lambda row: last if row.position is None else row.position)

    def everything_else(self) -> dict[str, int]:
        """MACs and parameters outside the convolutions (BatchNorm, linear layers, pooling...):
        what the per-layer rows leave for the totals, so that the parts add up."""
        rows = self.in_model_order()
        return {
            key: self.totals[key] - sum(getattr(row, key) for row in rows)
            for key in ("macs_before", "macs_after", "params_before", "params_after")
        }

    def to_json(self, path: str | Path | None = None) -> str:
        """The report as indented JSON; also written to ``path`` when given."""
        return emit(_dumps(self.to_dict()) + "\n", path)

    @classmethod
    def from_json(cls: type[_Report], source: str | Path) -> _Report:
        """Read a report from a JSON string or from the path of a JSON file."""
        text = str(source)
        if not text.lstrip().startswith("{"):
            text = Path(source).read_text(encoding="utf-8")
        return cls.from_dict(json.loads(text))


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


def emit(text: str, path: str | Path | None) -> str:
    if path is not None:
        Path(path).write_text(text, encoding="utf-8", newline="")
    return text
