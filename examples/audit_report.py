"""An audit of a conversion: what was converted, what was skipped and why, what it saves.

    python examples/audit_report.py [--model resnet18] [--size 224] [--out-dir ghostify-out]

Converts a torchvision model (random weights, nothing downloaded) and files the savings report
(MACs and parameters counted with fvcore, layer by layer) as a table, JSON, Markdown, CSV and a
chart (the chart needs ``pip install 'ghostify[plot]'``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torchvision

import ghostify


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18", help="a torchvision model name")
    parser.add_argument("--size", type=int, default=224, help="input height and width")
    parser.add_argument("--out-dir", type=Path, default=Path("ghostify-out"))
    options = parser.parse_args()
    options.out_dir.mkdir(parents=True, exist_ok=True)

    model = torchvision.models.get_model(options.model).eval()
    x = torch.randn(1, 3, options.size, options.size)
    ghostify.convert(model, example_inputs=x)

    savings = ghostify.report(model, example_inputs=x)
    print(savings.table(max_rows=8))  # largest savings first, totals at the bottom
    for row in ghostify.plan_of(model)["skipped"]:
        print(f"kept as it was: {row['name']} ({row['reason']})")

    totals = savings.to_dict()["totals"]
    print(f"MACs {totals['macs_before']:,} -> {totals['macs_after']:,}")
    savings.to_json(options.out_dir / "savings.json")  # the full record; SavingsReport.from_json
    savings.to_markdown(options.out_dir / "savings.md")  # for a review; the chart beside it
    savings.to_csv(options.out_dir / "savings.csv")  # one row per layer
    savings.to_chart(options.out_dir / "savings.png")  # per-layer MACs before and after
    print(f"wrote savings.json, .md, .csv and .png to {options.out_dir}/")


if __name__ == "__main__":
    main()
