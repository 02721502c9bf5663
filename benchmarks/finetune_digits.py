"""Does init="weights" give fine-tuning a better start than init="scratch"? Measured on digits.

    python benchmarks/finetune_digits.py [--ratio 2] [--epochs 3]

Trains the small CNN of ghostify/testing/digits.py, converts a copy with each init, and prints test
accuracy right after conversion and after each fine-tuning epoch, side by side.
"""

from __future__ import annotations

import argparse
import copy

import torch

import ghostify
from ghostify.testing import digits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=5, help="fine-tuning runs averaged per init")
    options = parser.parse_args()
    model, (train_x, train_y, test_x, test_y) = digits.trained_cnn()
    print(f"original: test accuracy {digits.accuracy(model, test_x, test_y):.3f}")
    print(f"mean test accuracy over {options.seeds} fine-tuning seeds (shuffled mini-batches)")
    print(
        f"{'init':8} {'converted':>9} "
        + " ".join(f"{f'epoch {e}':>8}" for e in range(1, 1 + options.epochs))
    )
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


if __name__ == "__main__":
    main()
