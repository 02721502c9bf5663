"""Pre-fine-tune step: convert a ResNet-50, file the savings report, save and reload the result.

    python examples/convert_resnet50.py [--ratio 2] [--out-dir ghostify-out]

Uses an untrained torchvision ResNet-50 (no download); with a trained model, load its weights first:
the conversion keeps the trained filters it can (init="weights").
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torchvision.models import resnet50

import ghostify


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=int, default=2)
    parser.add_argument("--out-dir", type=Path, default=Path("ghostify-out"))
    options = parser.parse_args()
    options.out_dir.mkdir(parents=True, exist_ok=True)

    x = torch.randn(1, 3, 224, 224)
    model = resnet50().eval()

    ghostify.convert(model, ratio=options.ratio, example_inputs=x)
    savings = ghostify.report(model, example_inputs=x)
    print(savings.table(max_rows=10))
    savings.to_json(options.out_dir / "savings.json")
    savings.to_markdown(options.out_dir / "savings.md")
    savings.to_csv(options.out_dir / "savings.csv")

    # The checkpoint: weights plus the plan that rebuilds the architecture.
    plan = ghostify.plan_of(model)
    torch.save(model.state_dict(), options.out_dir / "resnet50-ghost.pt")
    (options.out_dir / "plan.json").write_text(json.dumps(plan, indent=1))

    saved_plan = json.loads((options.out_dir / "plan.json").read_text())
    fresh = ghostify.convert(resnet50(), plan=saved_plan)
    state = torch.load(options.out_dir / "resnet50-ghost.pt", weights_only=True)
    fresh.load_state_dict(state, strict=True)
    with torch.no_grad():
        converted, reloaded = model(x), fresh.eval()(x)
    assert torch.equal(converted, reloaded), "the reloaded model must compute the same outputs"
    print("\nthe model rebuilt from plan.json + resnet50-ghost.pt computes the same outputs")
    print(f"files written to {options.out_dir}/")


if __name__ == "__main__":
    main()
