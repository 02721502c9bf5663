"""Draw the pictures in docs/img/: the GhostModule diagram and ResNet-50's savings chart.

    python docs/make_figures.py [--out docs/img]

Both come from code in this repository (matplotlib for the diagram, ``SavingsReport.to_chart``
for the chart), so they can be regenerated whenever the module or the report changes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib
import torch
import torchvision
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Rectangle

import ghostify

INTRINSIC = "#2b7bba"
GHOST = "#f28e2b"
OP = "#eef2f6"


def _op(axes, x: float, y: float, width: float, height: float, title: str, detail: str) -> None:
    """An operation: a rounded box with a bold title and a smaller description."""
    axes.add_patch(
        FancyBboxPatch(
            (x, y),
            width,
            height,
            boxstyle="round,pad=0.02,rounding_size=0.08",
            facecolor=OP,
            edgecolor="#52606d",
            linewidth=1.2,
        )
    )
    axes.text(
        x + width / 2,
        y + height * 0.68,
        title,
        ha="center",
        va="center",
        fontsize=9.5,
        weight="bold",
    )
    axes.text(x + width / 2, y + height * 0.3, detail, ha="center", va="center", fontsize=7.5)


def _maps(axes, x: float, y: float, colours: list[str], label: str) -> list[tuple[float, float]]:
    """A stack of feature maps (one thin slab per channel); returns each slab's centre."""
    centres = []
    for i, colour in enumerate(colours):
        top = y - i * 0.32
        axes.add_patch(Rectangle((x, top), 0.55, 0.26, facecolor=colour, edgecolor="white"))
        centres.append((x + 0.275, top + 0.13))
    axes.text(x + 0.275, y + 0.45, label, ha="center", va="bottom", fontsize=8)
    return centres


def _arrow(axes, start: tuple[float, float], end: tuple[float, float], **style) -> None:
    style = {"arrowstyle": "-|>", "mutation_scale": 10, "color": "#52606d", "lw": 1.0, **style}
    axes.add_patch(FancyArrowPatch(start, end, shrinkA=2, shrinkB=2, **style))


def ghost_module_diagram(path: Path) -> Path:
    """The GhostModule as ghostify builds it (s = 2 here: one ghost per intrinsic channel)."""
    figure = Figure(figsize=(11, 3.6), layout="constrained")
    axes = figure.add_subplot()
    axes.set_xlim(0, 16.2)
    axes.set_ylim(1.25, 5.1)
    axes.axis("off")
    m = 4
    box_y, box_h = 2.0, 2.0
    inputs = _maps(axes, 0.2, 3.25, ["#9aa5b1"] * 3, "input\nC_in x H x W")
    _op(
        axes,
        1.35,
        box_y,
        2.3,
        box_h,
        "primary conv",
        "the original k x k conv:\nstride, padding, groups;\nm = ceil(out / s) filters,\n"
        "kept trained filters",
    )
    for x, y in inputs:
        _arrow(axes, (x + 0.28, y), (1.35, y))
    intrinsic = _maps(axes, 4.2, 3.4, [INTRINSIC] * m, "intrinsic\nm x H' x W'")
    for x, y in intrinsic:
        _arrow(axes, (3.65, y), (x - 0.28, y))
    _op(
        axes,
        5.4,
        box_y,
        2.5,
        box_h,
        "cheap operation",
        "depthwise d x d conv,\ngroups = m, stride 1,\n'same' padding, channel\nmultiplier s - 1",
    )
    ghosts = _maps(axes, 8.5, 3.4, [GHOST] * m, "ghosts\n(out - m) x H' x W'")
    for (xi, yi), (xg, yg) in zip(intrinsic, ghosts, strict=True):
        _arrow(axes, (xi + 0.28, yi), (5.4, yi), color=INTRINSIC)
        _arrow(axes, (7.9, yg), (xg - 0.28, yg), color=GHOST)
        _arrow(axes, (xg + 0.28, yg), (9.6, yg), color=GHOST)
    _op(axes, 9.6, box_y, 1.5, box_h, "concat", "[intrinsic, ghosts]\nno gather")
    _arrow(
        axes,
        (4.475, 4.15),
        (10.35, 4.02),
        color=INTRINSIC,
        lw=1.2,
        connectionstyle="arc3,rad=-0.12",
    )
    axes.text(
        7.4,
        4.55,
        "intrinsic channels go to the output unchanged",
        ha="center",
        fontsize=7.5,
        color=INTRINSIC,
    )
    _op(
        axes,
        11.6,
        box_y,
        2.3,
        box_h,
        "channel order",
        "optional: back to the\noriginal order; usually\nfolded into the next\nBN / conv instead",
    )
    _arrow(axes, (11.1, 3.0), (11.6, 3.0))
    order = [INTRINSIC, GHOST, GHOST, INTRINSIC, GHOST, INTRINSIC, INTRINSIC, GHOST]
    output = _maps(axes, 14.5, 4.1, order, "output\nout x H' x W'")
    for x, y in output:
        _arrow(axes, (13.9, 3.0), (x - 0.28, y), lw=0.5)
    axes.text(
        8.1,
        1.45,
        "Same output shape as the Conv2d it replaces, for every input size. Intrinsic channels "
        "are exact copies of trained filters; each ghost's d x d kernel is fitted to its original "
        "filter, data-free.",
        ha="center",
        va="center",
        fontsize=8,
        style="italic",
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    # SVG text stays text (searchable, sharp at any size); no date, so reruns give the same file.
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        figure.savefig(path, dpi=130, metadata={"Date": None} if path.suffix == ".svg" else {})
    return path


def savings_chart(path: Path, ratio: int = 2) -> Path:
    """ResNet-50 at 224x224 converted with ``ratio``: the report's per-layer chart."""
    model = ghostify.convert(torchvision.models.resnet50(), ratio=ratio, init="scratch")
    report = ghostify.report(model, torch.randn(1, 3, 224, 224), spec="torchvision:resnet50")
    return report.to_chart(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "img")
    options = parser.parse_args()
    print(ghost_module_diagram(options.out / "ghost_module.png"))
    print(savings_chart(options.out / "resnet50_savings.png"))


if __name__ == "__main__":
    main()
