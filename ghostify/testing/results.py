"""Benchmark result files: every figure in the docs is read from one of these, never retyped.

A benchmark script measures, then calls ``write_results`` once; the file
``benchmarks/results/<benchmark>.json`` holds the command that made it, the conditions it ran
under and its tables. The documentation build renders a table from such a file wherever a page
says ``<!-- table: <benchmark>/<table id> -->`` (``markdown_table``).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
SCHEMA = "ghostify.results/1"


@dataclass
class Table:
    """One table of a benchmark: ``rows`` are lists of cells, one per column."""

    id: str
    title: str
    columns: list[str]
    rows: list[list[Any]]
    notes: str = ""


@dataclass
class Results:
    """What one run of a benchmark measured, and how."""

    benchmark: str
    command: str
    tables: list[Table]
    conditions: dict[str, Any] = field(default_factory=dict)
    date: str = ""
    schema: str = SCHEMA

    def table(self, table_id: str) -> Table:
        for table in self.tables:
            if table.id == table_id:
                return table
        known = ", ".join(t.id for t in self.tables) or "none"
        raise KeyError(f"{self.benchmark} has no table {table_id!r} (it has: {known})")


def machine_conditions() -> dict[str, Any]:
    """The facts a reader needs to judge a figure: CPU, cores, threads, library versions."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def write_results(
    benchmark: str,
    tables: list[Table],
    *,
    command: str | None = None,
    conditions: dict[str, Any] | None = None,
    directory: Path | None = None,
    merge: bool = False,
) -> Path:
    """Write ``benchmarks/results/<benchmark>.json`` (or into ``directory``); return its path.

    ``merge=True`` keeps what the file already holds and ``tables`` do not measure again (a
    long sweep run in pieces): its other tables, and the rows of these tables whose text and
    integer cells (model, batch, setting...) no new row has.
    """
    if merge:
        tables = _merged(benchmark, tables, directory)
    results = Results(
        benchmark=benchmark,
        command=command or "python " + " ".join(sys.argv),
        tables=tables,
        conditions={**machine_conditions(), **(conditions or {})},
        date=time.strftime("%Y-%m-%d %H:%M"),
    )
    folder = directory or RESULTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{benchmark}.json"
    path.write_text(json.dumps(asdict(results), indent=1, default=str) + "\n")
    return path


def _merged(benchmark: str, tables: list[Table], directory: Path | None) -> list[Table]:
    try:
        earlier = read_results(benchmark, directory)
    except (OSError, ValueError):
        return tables

    def key(row: list[Any]) -> tuple[Any, ...]:
        return tuple(cell for cell in row if isinstance(cell, (str, int)))

    ids = {table.id for table in tables}
    merged = [table for table in earlier.tables if table.id not in ids]
    for table in tables:
        old = next((t.rows for t in earlier.tables if t.id == table.id), [])
        new = {key(row) for row in table.rows}
        rows = [row for row in old if key(row) not in new] + table.rows
        merged.append(Table(table.id, table.title, table.columns, rows, table.notes))
    return merged


def read_results(benchmark: str, directory: Path | None = None) -> Results:
    """The results file of ``benchmark``."""
    path = (directory or RESULTS_DIR) / f"{benchmark}.json"
    data = json.loads(path.read_text())
    if data.get("schema") != SCHEMA:
        raise ValueError(f"{path} is not a {SCHEMA} file (schema {data.get('schema')!r})")
    tables = [Table(**table) for table in data.pop("tables")]
    return Results(tables=tables, **data)


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value).replace("|", "\\|")


def markdown_table(results: Results, table_id: str, where: dict[str, str] | None = None) -> str:
    """One table of ``results`` as Markdown, with its title, notes and the command that made it;
    ``where`` keeps only the rows whose cell in each named column reads as the given text."""
    table = results.table(table_id)
    rows = table.rows
    for column, text in (where or {}).items():
        if column not in table.columns:
            raise KeyError(f"{table_id} has no column {column!r} (it has: {table.columns})")
        at = table.columns.index(column)
        rows = [row for row in rows if str(row[at]) == text]
    if not rows:
        raise ValueError(f"no row of {table_id} matches {where}")
    lines = [
        "| " + " | ".join(table.columns) + " |",
        "|" + "|".join("---" for _ in table.columns) + "|",
    ]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    footer = f"`{results.command}` ({results.date}"
    cpu = results.conditions.get("cpu")
    if cpu:
        footer += f"; {cpu}, {results.conditions.get('torch_threads')} torch thread(s)"
    footer += ")"
    parts = [f"**{table.title}**", "", *lines, ""]
    if table.notes:
        parts += [table.notes, ""]
    parts.append(f"Measured with {footer}.")
    return "\n".join(parts)
