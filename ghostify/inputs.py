"""Normalise ``example_inputs`` the way torch.fx and torch.export take them."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from .errors import ConfigError


def as_args(example_inputs: Any) -> tuple[Any, ...]:
    """Positional arguments for ``model(*args)``: a tensor ``x`` and ``(x,)`` mean the same.

    A model that takes a list (torchvision detection models) gets ``([img1, img2],)``. A bare list
    is refused because it is ambiguous: several arguments, or one list argument?
    """
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, tuple):
        return example_inputs
    raise ConfigError(
        "example_inputs must be a tensor or a tuple of the model's positional arguments, e.g. "
        "torch.randn(1, 3, 224, 224), (x,), (x, mask) or ([img1, img2],) for a model that takes a "
        f"list; got {type(example_inputs).__name__}"
    )


def describe_args(args: tuple[Any, ...]) -> str:
    """Inputs for an error message: tensor shapes as ``1x3x224x224``, other values by type."""
    return ", ".join(
        "x".join(map(str, a.shape)) if isinstance(a, torch.Tensor) else type(a).__name__
        for a in args
    )


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode for a probe forward, then restore each one's own flag.

    Probing in eval mode keeps BatchNorm running statistics untouched; restoring per module (not
    ``model.train(old)``) keeps mixed modes, such as a frozen backbone, as the user set them.
    """
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training
