"""MkDocs hook: benchmark tables come from the benchmarks' result files, never retyped.

A page that says ``<!-- table: <benchmark>/<table id> -->`` gets that table of
``benchmarks/results/<benchmark>.json`` rendered by ``ghostify.testing.results.markdown_table``.
``<!-- table: <benchmark>/<table id> column=value -->`` keeps the rows whose cell in that
column reads ``value`` (``model=resnet50``; underscores read as spaces in the column name).
A marker naming a missing file, table, column or row stops the build (an error, not a warning).

README.md is read on GitHub as it is, so its tables are rendered into the file itself, between
the marker and ``<!-- /table -->``:  ``python docs/mkdocs/hooks.py README.md`` rewrites them,
and tests/test_docs.py fails while README's copy differs from the result files.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

from mkdocs.exceptions import PluginError

from ghostify.testing.results import markdown_table, read_results

_MARKER = r"<!-- table: ([\w.-]+)/([\w.-]+)((?: [\w-]+=[\w.-]+)*) -->"
TABLE_MARKER = re.compile(rf"^{_MARKER}[ \t]*$", re.M)
IN_PLACE = re.compile(rf"^({_MARKER})\n.*?^<!-- /table -->$", re.M | re.S)


class TableMarkerError(PluginError):
    """A page embeds a benchmark table that no results file holds (MkDocs stops, in one line)."""


def _table(benchmark: str, table_id: str, filters: str, where: str, directory: Path | None) -> str:
    rows = dict(item.split("=") for item in filters.split())
    rows = {column.replace("_", " "): value for column, value in rows.items()}
    try:
        return markdown_table(read_results(benchmark, directory), table_id, rows)
    except (OSError, KeyError, ValueError) as error:
        raise TableMarkerError(f"{where}: table {benchmark}/{table_id}: {error}") from error


def render_tables(markdown: str, where: str = "page", directory: Path | None = None) -> str:
    """Replace every table marker in ``markdown`` by the table it names (``where`` names the
    page in errors; ``directory`` holds the result files, benchmarks/results by default)."""
    markdown = IN_PLACE.sub(lambda m: m[1], markdown)  # a copy rendered in place is redone
    return TABLE_MARKER.sub(lambda m: _table(m[1], m[2], m[3], where, directory), markdown)


def render_in_place(markdown: str, where: str = "page", directory: Path | None = None) -> str:
    """``markdown`` with each marker followed by its table and ``<!-- /table -->``."""
    markdown = IN_PLACE.sub(lambda m: m[1], markdown)
    return TABLE_MARKER.sub(
        lambda m: f"{m[0]}\n{_table(m[1], m[2], m[3], where, directory)}\n<!-- /table -->",
        markdown,
    )


def on_page_markdown(markdown: str, page: Any, **_: Any) -> str:
    return render_tables(markdown, page.file.src_uri)


if __name__ == "__main__":
    for name in sys.argv[1:]:
        path = Path(name)
        path.write_text(render_in_place(path.read_text(), name))
