"""What a training step keeps for backward, counted exactly from the autograd graph.

Process RSS is too noisy to compare two models' activation memory, and a saved-tensor hook does
not see tensors a custom autograd function keeps on its context. ``graph_saved_bytes`` walks the
graph behind an output instead and adds up every storage its nodes hold (saved tensors, context
attributes), each storage once however many views of it are kept.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch


def _tensors(value: object) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


def _held(node: object) -> Iterator[torch.Tensor]:
    """The tensors an autograd node keeps: ``_saved_*`` fields of torch's nodes, and the saved
    tensors and tensor attributes of a custom Function's context."""
    for name in dir(node):
        if name.startswith("_saved_"):
            try:
                yield from _tensors(getattr(node, name))
            except RuntimeError:  # freed already, or changed in place since (not ours to read)
                continue
    if hasattr(node, "saved_tensors"):
        with contextlib.suppress(RuntimeError):
            yield from _tensors(node.saved_tensors)
        yield from _tensors(list(vars(node).values()) if hasattr(node, "__dict__") else [])


def graph_saved_bytes(
    outputs: torch.Tensor | Iterable[torch.Tensor], exclude: Iterable[torch.Tensor] = ()
) -> int:
    """Bytes of every storage the autograd graph behind ``outputs`` keeps for backward.

    Storages of ``exclude`` (e.g. the parameters, which exist anyway) are not counted.
    """
    roots = [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen_nodes: set[int] = set()
    storages: dict[int, int] = {}
    stack = [t.grad_fn for t in roots if t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen_nodes:
            continue
        seen_nodes.add(id(node))
        for tensor in _held(node):
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in skip:
                storages[storage.data_ptr()] = storage.nbytes()
        stack.extend(next_node for next_node, _ in node.next_functions)
    return sum(storages.values())
