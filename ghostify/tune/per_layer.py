"""The per-layer path: run the whole model to catch what one module sees.

Used where the stage-wise propagation cannot go: a converted layer or BatchNorm outside every
traced graph, or called at several places (the inputs of all its calls are needed at once), and
to reach a traced submodule's inputs (the model run up to it, and stopped there).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..errors import ConversionError


class _Stop(Exception):
    """Raised by a hook once the module of interest has run: the rest of the forward is skipped."""


def collect(
    model: nn.Module, inputs: torch.Tensor, module: nn.Module, calls: int, want: str
) -> list[torch.Tensor]:
    """``module``'s input or output at each of its ``calls`` calls in ``model(inputs)``."""
    store: list[torch.Tensor] = []

    def keep(value: torch.Tensor) -> None:
        store.append(value.detach())
        if len(store) == calls:
            raise _Stop

    if want == "input":
        handle = module.register_forward_pre_hook(lambda _m, args: keep(args[0]))
    else:
        handle = module.register_forward_hook(lambda _m, _args, output: keep(output))
    try:
        with torch.no_grad():
            model(inputs)
    except _Stop:
        pass
    finally:
        handle.remove()
    if len(store) != calls:
        raise ConversionError(
            f"a {type(module).__name__} ran {len(store)} time(s) on a calibration batch but "
            f"{calls} on the first; calibration needs the same path for every batch"
        )
    return store


def catch_calls(
    model: nn.Module, batches: Iterable[torch.Tensor], module: nn.Module
) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
    """The ``(args, kwargs)`` of ``module``'s (single) call in ``model(x)``, per batch ``x``."""
    caught: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def keep(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        caught.append((args, kwargs))
        raise _Stop

    handle = module.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        for inputs in batches:
            before = len(caught)
            try:
                with torch.no_grad():
                    model(inputs)
            except _Stop:
                pass
            if len(caught) != before + 1:
                raise ConversionError(
                    f"a {type(module).__name__} did not run on a calibration batch but did on "
                    "the first; calibration needs the same path for every batch"
                )
    finally:
        handle.remove()
    return caught
