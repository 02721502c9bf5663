"""Does init="weights" give fine-tuning a better start than init="scratch"? Measured on digits.

    python benchmarks/finetune_digits.py [--ratio 2] [--epochs 3] [--seeds 5] [--quick]

Trains the small CNN of ghostify/testing/digits.py, converts a copy with each init, and prints test
accuracy right after conversion and after each fine-tuning epoch (labelled training, Adam at
lr 1e-3), side by side. Writes benchmarks/results/finetune_digits.json.
"""

from __future__ import annotations

import argparse
import copy

import torch

import ghostify
from ghostify.testing import digits
from ghostify.testing.results import Table, write_results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=5, help="fine-tuning runs averaged per init")
    parser.add_argument("--quick", action="store_true", help="1 seed, 1 epoch")
    options = parser.parse_args()
    if options.quick:
        options.seeds, options.epochs = 1, 1
    model, (train_x, train_y, test_x, test_y) = digits.trained_cnn()
    print(f"original: test accuracy {digits.accuracy(model, test_x, test_y):.3f}")
    print(f"mean test accuracy over {options.seeds} fine-tuning seeds (shuffled mini-batches)")
    print(
        f"{'init':8} {'converted':>9} "
        + " ".join(f"{f'epoch {e}':>8}" for e in range(1, 1 + options.epochs))
    )
    rows = []
    for init in ("weights", "scratch"):
        runs = []
        for seed in range(options.seeds):
            torch.manual_seed(seed)  # scratch init and the batch order depend on it
            ghost = ghostify.convert(copy.deepcopy(model), ratio=options.ratio, init=init)
            run = [digits.accuracy(ghost, test_x, test_y)]
            for _ in range(options.epochs):
                order = torch.randperm(len(train_x))
                digits.train(ghost, train_x[order], train_y[order], epochs=1, lr=1e-3)
                run.append(digits.accuracy(ghost, test_x, test_y))
            runs.append(run)
        scores = [sum(column) / len(column) for column in zip(*runs, strict=True)]
        print(
            f"{init:8} "
            + " ".join(f"{s:>8.3f}" if i else f"{s:>9.3f}" for i, s in enumerate(scores))
        )
        rows.append([init, *(f"{100 * s:.1f}%" for s in scores)])
    table = Table(
        "inits",
        f"Labelled fine-tuning of the digits CNN converted at ratio {options.ratio}",
        ["init", "converted", *(f"after {e}" for e in range(1, 1 + options.epochs))],
        rows,
        f"Mean test accuracy over {options.seeds} fine-tuning seeds; the original CNN: "
        f"{100 * digits.accuracy(model, test_x, test_y):.1f}%.",
    )
    print(write_results("finetune_digits", [table]))


if __name__ == "__main__":
    main()
