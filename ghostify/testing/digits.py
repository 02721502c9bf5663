"""A small CNN trained on scikit-learn's digits, the real data set every test box has.

Shared by tests/test_trained.py and benchmarks/finetune_digits.py. The images are 8x8 greyscale
digits (1,797 of them); a fixed split and seed make every run the same.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

BATCH = 64


def load() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train images, train labels, test images, test labels), images scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16
    labels = torch.tensor(digits.target)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    train, test = order[:1400], order[1400:]
    return images[train], labels[train], images[test], labels[test]


def _conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, 3, padding=1),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    ]


def make_cnn() -> nn.Sequential:
    """Four 3x3 conv + BN + ReLU blocks, one max-pool, global pooling and a linear classifier.

    The convolutions are modules "0", "3", "7" and "10" of the Sequential.
    """
    return nn.Sequential(
        *_conv_bn_relu(1, 32),
        *_conv_bn_relu(32, 64),
        nn.MaxPool2d(2),
        *_conv_bn_relu(64, 64),
        *_conv_bn_relu(64, 64),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )


def train(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    epochs: int,
    lr: float = 3e-3,
    anneal: bool = False,
) -> nn.Module:
    """Adam training in fixed-order mini-batches of 64.

    ``anneal`` decays the learning rate linearly to zero over the run: a few epochs then end on
    a settled network (at a constant rate, test accuracy still swings by tens of points from one
    epoch to the next in the first five).
    """
    optimiser = torch.optim.Adam(model.parameters(), lr)
    steps = epochs * -(-len(images) // BATCH)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, (lambda step: 1 - step / steps) if anneal else (lambda step: 1.0)
    )
    model.train()
    for _ in range(epochs):
        for start in range(0, len(images), BATCH):
            optimiser.zero_grad()
            loss = nn.functional.cross_entropy(
                model(images[start : start + BATCH]), labels[start : start + BATCH]
            )
            loss.backward()
            optimiser.step()
            schedule.step()
    return model


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in eval mode."""
    model.eval()
    with torch.no_grad():
        return float((model(images).argmax(dim=1) == labels).float().mean())


def trained_cnn(
    epochs: int = 15, anneal: bool = False
) -> tuple[nn.Sequential, tuple[torch.Tensor, ...]]:
    """A freshly trained CNN and the data split.

    The defaults (15 epochs at a constant rate, about 99% test accuracy) are what
    benchmarks/finetune_digits.py uses; ``epochs=4, anneal=True`` reaches
    the same accuracy in a quarter of the time.
    """
    torch.manual_seed(0)
    data = load()
    return train(make_cnn(), data[0], data[1], epochs, anneal=anneal), data


def shared_trained_cnn(folder: Path) -> nn.Sequential:
    """``trained_cnn(epochs=4, anneal=True)``'s network, trained once per test run.

    Under pytest-xdist the workers share one training through a file in ``folder`` (the run's
    common temporary folder), guarded by a file lock; a single process just trains it.
    """
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return trained_cnn(epochs=4, anneal=True)[0]
    from filelock import FileLock

    path = Path(folder) / "digits-cnn.pt"
    with FileLock(f"{path}.lock"):
        if not path.exists():
            torch.save(trained_cnn(epochs=4, anneal=True)[0].state_dict(), path)
        model = make_cnn()
        model.load_state_dict(torch.load(path, weights_only=True))
    return model
