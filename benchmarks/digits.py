"""A small CNN trained on scikit-learn's digits, the real data set every test box has.

Shared by tests/test_trained.py and benchmarks/finetune_digits.py. The images are 8x8 greyscale
digits (1,797 of them); a fixed split and seed make every run the same.
"""

from __future__ import annotations

import torch
from torch import nn


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
    """Four 3x3 conv + BN + ReLU blocks, one max-pool, global pooling and a linear classifier."""
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
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, epochs: int, lr: float = 3e-3
) -> nn.Module:
    """Plain Adam training in fixed-order mini-batches of 64."""
    optimiser = torch.optim.Adam(model.parameters(), lr)
    model.train()
    for _ in range(epochs):
        for start in range(0, len(images), 64):
            optimiser.zero_grad()
            loss = nn.functional.cross_entropy(
                model(images[start : start + 64]), labels[start : start + 64]
            )
            loss.backward()
            optimiser.step()
    return model


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(images).argmax(dim=1) == labels).float().mean())


def trained_cnn(epochs: int = 15) -> tuple[nn.Sequential, tuple[torch.Tensor, ...]]:
    """A freshly trained CNN (about 99% test accuracy) and the data split."""
    torch.manual_seed(0)
    data = load()
    return train(make_cnn(), data[0], data[1], epochs), data
