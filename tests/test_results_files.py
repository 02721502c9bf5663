"""Benchmark result files round-trip, and their tables render with the command that made them."""

from __future__ import annotations

import pytest

from ghostify.testing.results import Table, markdown_table, read_results, write_results


def test_results_round_trip_and_render(tmp_path) -> None:
    table = Table(
        "speed", "Speed-up", ["model", "batch", "x"], [["resnet50", 8, 1.234], ["vgg16", 1, None]]
    )
    path = write_results("demo", [table], command="python benchmarks/demo.py", directory=tmp_path)
    assert path.name == "demo.json"
    results = read_results("demo", tmp_path)
    assert results.command == "python benchmarks/demo.py"
    assert results.conditions["torch"]  # the conditions are filled in
    text = markdown_table(results, "speed")
    assert "| resnet50 | 8 | 1.23 |" in text
    assert "| vgg16 | 1 | – |" in text
    assert "`python benchmarks/demo.py`" in text
    with pytest.raises(KeyError, match="has no table 'nope'"):
        markdown_table(results, "nope")
    only = markdown_table(results, "speed", {"model": "vgg16", "batch": "1"})
    assert "| vgg16 | 1 | – |" in only and "resnet50" not in only
    with pytest.raises(KeyError, match="no column 'size'"):
        markdown_table(results, "speed", {"size": "8"})
    with pytest.raises(ValueError, match="no row of speed matches"):
        markdown_table(results, "speed", {"model": "vgg19"})


def test_a_file_of_another_kind_is_refused(tmp_path) -> None:
    (tmp_path / "other.json").write_text('{"schema": "something/9", "tables": []}')
    with pytest.raises(ValueError, match="not a ghostify.results/1 file"):
        read_results("other", tmp_path)
