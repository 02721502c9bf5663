"""Comparing a model's outputs by structure: containers, keys, tensor shapes and dtypes."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch


def signature(out: Any, ragged: bool = False) -> Any:
    """JSON-able structure of an output: containers, keys, tensor shapes and dtypes.

    ``ragged`` drops the leading dim of tensors (detection: the number of boxes depends on the
    weights, not on the architecture)."""
    if isinstance(out, torch.Tensor):
        shape = list(out.shape[1:] if ragged and out.dim() > 0 else out.shape)
        return ["tensor", shape, str(out.dtype).removeprefix("torch.")]
    if isinstance(out, Mapping):
        return ["dict", [[str(k), signature(v, ragged)] for k, v in out.items()]]
    if isinstance(out, (list, tuple)):
        return [type(out).__name__, [signature(v, ragged) for v in out]]
    return type(out).__name__


def diff(want: Any, got: Any, path: str = "out") -> str:
    """Where two signatures first differ, as an indexing path into the output."""
    kind = want[0] if isinstance(want, list) else None
    if not isinstance(got, list) or got[0] != kind or kind == "tensor":
        return f"{path}: expected {describe(want)}, got {describe(got)}"
    if kind == "dict":
        keys_w, keys_g = [k for k, _ in want[1]], [k for k, _ in got[1]]
        if keys_w != keys_g:
            return f"{path}: expected keys {keys_w}, got {keys_g}"
        pairs = [(f"{path}[{k!r}]", w, g) for (k, w), (_, g) in zip(want[1], got[1], strict=True)]
    else:
        if len(want[1]) != len(got[1]):
            return f"{path}: expected {kind} of {len(want[1])}, got {len(got[1])}"
        pairs = [
            (f"{path}[{i}]", w, g) for i, (w, g) in enumerate(zip(want[1], got[1], strict=True))
        ]
    return next((diff(w, g, p) for p, w, g in pairs if w != g), f"{path}: equal")


def describe(sig: Any) -> str:
    """A signature in words: ``tensor[2, 10] float32``, ``dict``, ``list``."""
    if isinstance(sig, list) and sig[0] == "tensor":
        return f"tensor{sig[1]} {sig[2]}"
    return sig[0] if isinstance(sig, list) else str(sig)


def tensors(out: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a nested output."""
    if isinstance(out, torch.Tensor):
        yield out
    elif isinstance(out, Mapping):
        for value in out.values():
            yield from tensors(value)
    elif isinstance(out, (list, tuple)):
        for value in out:
            yield from tensors(value)


def count_nonfinite(out: Any) -> int:
    """How many NaN or infinite values the floating-point tensors of a nested output hold."""
    return sum(
        int((~torch.isfinite(t.detach())).sum())
        for t in tensors(out)
        if t.is_floating_point() or t.is_complex()
    )
