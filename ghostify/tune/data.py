"""Calibration and fine-tuning data: whatever users pass, as re-iterable batches of inputs.

Accepted: one tensor of inputs (split into batches), a list or tuple of batches, or any iterable
or DataLoader yielding batches; a batch is an input tensor or an ``(inputs, labels, ...)`` tuple
or list. Models that take one tensor argument are supported (the common case for convolutional
networks); a batch whose first element is not a tensor is refused with the reason.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch

from ..errors import ConfigError
from ..inputs import eval_mode
from ..utils import describe_error

Batch = tuple[torch.Tensor, torch.Tensor | None]


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        dtype = str(value.dtype).replace("torch.", "")
        return f"a {value.dim()}-D {dtype} tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"


def split_batch(batch: object, index: int, what: str) -> Batch:
    """``(inputs, labels or None)`` of one batch; a ConfigError naming it if it is not one."""
    labels = None
    if isinstance(batch, tuple | list):
        if not batch:
            raise ConfigError(f"{what} batch {index} is an empty {type(batch).__name__}")
        inputs = batch[0]
        if len(batch) > 1 and isinstance(batch[1], torch.Tensor):
            labels = batch[1]
    else:
        inputs = batch
    if not isinstance(inputs, torch.Tensor):
        raise ConfigError(
            f"{what} batch {index} is {_describe(batch)}; expected a tensor of model inputs or "
            "an (inputs, labels) tuple whose first element is that tensor"
        )
    if inputs.dim() < 2 or not inputs.is_floating_point():
        hint = (
            " (it looks like labels: pass the inputs, or (inputs, labels) batches)"
            if not inputs.is_floating_point()
            else ""
        )
        raise ConfigError(
            f"{what} batch {index} holds {_describe(inputs)}{hint}; expected floating-point "
            "model inputs with a batch dimension first, e.g. (N, C, H, W) images"
        )
    if inputs.shape[0] == 0:
        raise ConfigError(f"{what} batch {index} has no sample (shape {tuple(inputs.shape)})")
    return inputs, labels


class Batches:
    """Re-iterable ``(inputs, labels or None)`` batches, moved to ``device``, checked as read."""

    def __init__(self, data: Any, what: str = "calibration_data", batch_size: int = 64) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive int; got {batch_size!r}")
        self.what = what
        self.device: torch.device | None = None
        if isinstance(data, torch.Tensor):
            split_batch(data, 0, what)  # refuse labels and scalars before splitting
            self._source: Iterable = list(data.split(batch_size))
        elif isinstance(data, Iterable) and not isinstance(data, str | bytes | dict):
            # A one-shot iterator (a generator) is read once into a list: calibration and
            # fine-tuning read the data several times.
            self._source = list(data) if iter(data) is data else data
        else:
            raise ConfigError(
                f"{what} must be a tensor of inputs, a list of batches, or an iterable / "
                f"DataLoader yielding inputs or (inputs, labels) tuples; got {_describe(data)}"
            )
        self.first = self._first()

    def _first(self) -> Batch:
        for index, batch in enumerate(self._source):
            return split_batch(batch, index, self.what)
        raise ConfigError(f"{self.what} is empty: it yielded no batch; pass at least one")

    def __iter__(self) -> Iterator[Batch]:
        for index, batch in enumerate(self._source):
            inputs, labels = split_batch(batch, index, self.what)
            if self.device is not None:
                inputs = inputs.to(self.device, non_blocking=True)
                labels = None if labels is None else labels.to(self.device, non_blocking=True)
            yield inputs, labels

    def inputs(self) -> Iterator[torch.Tensor]:
        """The input tensors alone."""
        for inputs, _ in self:
            yield inputs

    def __len__(self) -> int:
        return len(self._source)  # type: ignore[arg-type]

    def check_model(self, model: torch.nn.Module) -> None:
        """Run the first batch's first samples through ``model`` (eval mode, no grad); a clear
        error if it fails.

        Also settles the device the batches are moved to: that of the model's parameters.
        """
        parameter = next(model.parameters(), None)
        self.device = None if parameter is None else parameter.device
        # A few samples say whether the model takes these inputs (a whole batch costs a pass).
        inputs = self.first[0][:8]
        inputs = inputs if self.device is None else inputs.to(self.device)
        try:
            with eval_mode(model), torch.no_grad():
                model(inputs)
        except Exception as error:
            raise ConfigError(
                f"the model rejected {self.what} batch 0 ({_describe(self.first[0])}): "
                f"{describe_error(error)}; pass batches shaped like the model's input"
            ) from error
