"""What the gather-free (balanced) ghost layout costs in data-free fit quality.

    python benchmarks/fit_quality.py [--ratio 2] [--quick]

A gather-free GhostModule computes ``multiplier`` ghosts from every kept filter (one depthwise
conv with a channel multiplier), so each kept filter feeds the same number of ghosts. The older
"free" layout let every ghost pick its best source (a gather before the cheap conv). For each
layer this prints the relative filter-fit residual sqrt(sum |W_g - d (*) W_s|^2 / sum |W_g|^2)
over the ghost filters under both assignments, on

- a CNN trained on scikit-learn's digits (real trained filters), and
- torchvision ResNet-50 (random initialisation: no learnt redundancy, the hardest case).

Writes benchmarks/results/fit_quality.json; ``--quick`` measures the digits CNN only.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from ghostify.fit.assignment import assign_balanced
from ghostify.fit.data_free import draft_from
from ghostify.fit.kept_filters import choose_kept
from ghostify.layers import GhostModule
from ghostify.surgery.selection import Rules, savings_reason
from ghostify.testing.results import Table, write_results


def layer_residuals(conv: nn.Conv2d, ratio: int) -> tuple[float, float]:
    """(free, balanced) relative residuals of the data-free fit of ``conv`` at ``ratio``."""
    ghost = GhostModule.like(conv, ratio=ratio)
    weight = conv.weight.detach()
    kept = choose_kept(weight, conv.groups, ghost.intrinsic_channels)
    costs = draft_from(kept, ghost.slot_source, conv.stride, conv.dilation, ghost.dw_size).costs
    total = weight[kept.ghosts].double().square().sum()
    free = costs.cost.min(dim=1).values.sum()
    slots = assign_balanced(costs.cost, ghost.slot_source)
    balanced = costs.cost[torch.arange(len(kept.ghosts)), ghost.slot_source[slots]].sum()
    return float((free / total).sqrt()), float((balanced / total).sqrt())


def convertible(model: nn.Module, ratio: int) -> list[tuple[str, nn.Conv2d]]:
    selection = Rules(ratio=ratio)
    return [
        (name, m)
        for name, m in model.named_modules()
        if type(m) is nn.Conv2d
        and m.in_channels > 3
        and savings_reason(m, selection.settings_for(name, m)) is None
    ]


def summarise(title: str, model: nn.Module, ratio: int) -> list:
    rows = [(name, *layer_residuals(conv, ratio)) for name, conv in convertible(model, ratio)]
    print(f"\n{title} (ratio {ratio}, {len(rows)} layers)")
    print("| layer | free | balanced | balanced / free |")
    print("|---|---:|---:|---:|")
    for name, free, balanced in rows[:: max(1, len(rows) // 8)]:
        print(f"| {name} | {free:.4f} | {balanced:.4f} | {balanced / free:.3f} |")
    mean_free = sum(r[1] for r in rows) / len(rows)
    mean_balanced = sum(r[2] for r in rows) / len(rows)
    print(
        f"| mean of all layers | {mean_free:.4f} | {mean_balanced:.4f} | "
        f"{mean_balanced / mean_free:.3f} |"
    )
    return [title, len(rows), f"{mean_free:.4f}", f"{mean_balanced:.4f}",
            f"{mean_balanced / mean_free:.3f}"]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="the digits CNN only")
    options = parser.parse_args()
    torch.manual_seed(0)
    from ghostify.testing import digits

    trained, _ = digits.trained_cnn()
    rows = [summarise("digits CNN, trained", trained, options.ratio)]
    if not options.quick:
        import torchvision

        rows.append(
            summarise("resnet50, random init", torchvision.models.resnet50(), options.ratio)
        )
    table = Table(
        "layouts",
        f"Data-free fit residual at ratio {options.ratio}: free against balanced layout",
        ["model", "layers", "free", "balanced", "balanced / free"],
        rows,
        "Mean over the layers of the relative filter residual of the ghost filters "
        "(0 is exact, 1 no better than zero filters).",
    )
    print(write_results("fit_quality", [table]))


if __name__ == "__main__":
    main()
