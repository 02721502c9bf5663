"""Pictures: the Markdown report shows its chart, and the docs' GhostModule diagram renders."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import ghostify

pytest.importorskip("matplotlib")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "docs"))
import make_figures  # docs/ is not a package: imported from its folder


@pytest.fixture(scope="module")
def small_report() -> ghostify.SavingsReport:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 16, 3), nn.ReLU(), nn.Conv2d(16, 32, 1))
    ghostify.convert(model, progress=False)
    return ghostify.report(model, torch.randn(1, 3, 16, 16), progress=False)


def test_markdown_with_a_path_embeds_the_chart_beside_it(small_report, tmp_path) -> None:
    text = small_report.to_markdown(tmp_path / "savings.md")
    assert "![MACs and parameters per convolution, before and after](savings.png)" in text
    assert (tmp_path / "savings.png").read_bytes().startswith(b"\x89PNG")
    # The image line sits under the totals table, before the per-layer table.
    assert text.index("| MACs |") < text.index("savings.png") < text.index("## Convolutions")


def test_markdown_without_a_path_has_no_image(small_report) -> None:
    text = small_report.to_markdown()
    assert "![" not in text and "| MACs |" in text


def test_ghost_module_diagram_renders(tmp_path) -> None:
    path = make_figures.ghost_module_diagram(tmp_path / "ghost.svg")
    svg = path.read_text()
    for label in ("primary conv", "cheap operation", "concat", "channel order"):
        assert label in svg
