"""ghostify's Ghost-ResNet-50 against the GhostNet paper's (Han et al., CVPR 2020, Table 3).

    python benchmarks/paper_resnet50.py [--size 224]

Counts torchvision's ResNet-50 and its conversions at s=2 and s=4 (stem kept, the default, and
converted) with ``ghostify.report`` (fvcore; with BatchNorm, and without it as after deploy
folds it). The counts depend only on the layers' shapes, so the conversions use
``init="scratch"`` (no fit). Writes benchmarks/results/paper.json.
"""

from __future__ import annotations

import argparse

import torch
from torchvision.models import resnet50

import ghostify
from ghostify.testing.results import Table, write_results

# The paper's Table 3: ResNet-50 and Ghost-ResNet-50 (s=2, s=4), MACs and parameters.
PAPER = {None: ("4.1 G", "25.6 M"), 2: ("2.2 G", "13.0 M"), 4: ("1.2 G", "6.5 M")}


def totals(ratio: int, skip_stem: bool, x: torch.Tensor) -> tuple[dict, dict]:
    """The report's totals (before and after) for ResNet-50 converted at ``ratio``, with and
    without BatchNorm (a deployment folds it into the convolutions)."""
    torch.manual_seed(0)
    model = resnet50().eval()
    ghostify.convert(model, ratio=ratio, init="scratch", skip_stem=skip_stem, progress=False)
    with_bn = ghostify.report(model, x, progress=False).to_dict()["totals"]
    without_bn = ghostify.report(model, x, include_batchnorm=False, progress=False)
    return with_bn, without_bn.to_dict()["totals"]


def giga(count: int) -> str:
    return f"{count / 1e9:.2f} G ({count:,})"


def short(count: int) -> str:
    return f"{count / 1e9:.2f} G"


def mega(count: int) -> str:
    return f"{count / 1e6:.2f} M ({count:,})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224, help="input height and width")
    options = parser.parse_args()
    x = torch.randn(1, 3, options.size, options.size)
    rows = []
    for ratio in (2, 4):
        for skip_stem in (True, False):
            counted, folded = totals(ratio, skip_stem, x)
            if not rows:
                original = [giga(counted["macs_before"]), short(folded["macs_before"])]
                rows.append(["ResNet-50", *PAPER[None], *original, mega(counted["params_before"])])
            name = f"Ghost-ResNet-50, s={ratio}" + ("" if skip_stem else ", stem converted too")
            paper = PAPER[ratio] if skip_stem else ("", "")
            after = [giga(counted["macs_after"]), short(folded["macs_after"])]
            rows.append([name, *paper, *after, mega(counted["params_after"])])
    table = Table(
        "resnet50",
        f"ResNet-50 at {options.size}x{options.size}: the paper's counts and ghostify's",
        [
            *("model", "paper MACs", "paper params", "ghostify MACs"),
            *("without BatchNorm", "ghostify params"),
        ],
        rows,
        "ghostify's counts are exact (fvcore: one fused multiply-add is one MAC, BatchNorm "
        "included, or left out as after deploy folds it; parameters are every nn.Parameter "
        "once).",
    )
    print(write_results("paper", [table]))


if __name__ == "__main__":
    main()
