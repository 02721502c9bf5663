"""A small CNN trained on scikit-learn's digits: the "trained model" of the other examples.

    python examples/digits_cnn.py [--epochs 4] [--out-dir .]

writes ``digits-cnn.pt`` (the trained state_dict) and ``digits-images.npy`` (512 unlabeled
training images, 1x8x8, for calibration). ``digits_cnn:make_cnn`` is the model SPEC the command
line builds it from. The digits are real images that ship with scikit-learn (1,797 of them).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn


def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train and test images (1x8x8, in [0, 1]) and labels, split with a fixed seed."""
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16
    labels = torch.tensor(data.target)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    train, test = order[:1400], order[1400:]
    return images[train], labels[train], images[test], labels[test]


def make_cnn() -> nn.Sequential:
    """Four 3x3 conv + BatchNorm + ReLU blocks, a max-pool, global pooling, a classifier."""

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(
        *block(1, 32),
        *block(32, 64),
        nn.MaxPool2d(2),
        *block(64, 64),
        *block(64, 64),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )


def train(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, epochs: int) -> nn.Module:
    """Adam with a learning rate decayed linearly to zero, batches of 64."""
    optimiser = torch.optim.Adam(model.parameters(), 3e-3)
    steps = epochs * -(-len(images) // 64)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: 1 - step / steps)
    model.train()
    for _ in range(epochs):
        for start in range(0, len(images), 64):
            batch = slice(start, start + 64)
            loss = nn.functional.cross_entropy(model(images[batch]), labels[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
    return model.eval()


def trained_cnn(epochs: int = 4) -> nn.Sequential:
    torch.manual_seed(0)
    train_images, train_labels, _, _ = digits()
    return train(make_cnn(), train_images, train_labels, epochs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--out-dir", type=Path, default=Path("."))
    options = parser.parse_args()
    options.out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(trained_cnn(options.epochs).state_dict(), options.out_dir / "digits-cnn.pt")
    np.save(options.out_dir / "digits-images.npy", digits()[0][:512].numpy())
    print(f"wrote {options.out_dir / 'digits-cnn.pt'} and {options.out_dir / 'digits-images.npy'}")


if __name__ == "__main__":
    main()
