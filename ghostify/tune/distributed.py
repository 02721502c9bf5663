"""torch.distributed without a launcher of our own: work on whatever process group exists.

Under ``torchrun`` (DDP, gloo on CPU, NCCL on GPU) every rank reads its own shard of the data,
accumulates its sums, and the sums are all-reduced, so every rank solves the same systems; the
fitted weights are then broadcast from rank 0 so they are identical bit for bit. Without a
process group every helper is a no-op. Progress bars show on rank 0 only.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

T = TypeVar("T")


def active() -> bool:
    """True inside an initialised process group with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def all_reduce_sum(tensors: list[torch.Tensor]) -> None:
    """Sum ``tensors`` across ranks, in place (one collective per dtype)."""
    if not active():
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for tensor in tensors:
        by_dtype.setdefault(tensor.dtype, []).append(tensor)
    for group in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.all_reduce(flat)
        offset = 0
        for tensor in group:
            tensor.copy_(flat[offset : offset + tensor.numel()].view_as(tensor))
            offset += tensor.numel()


def broadcast_module(module: nn.Module, source: int = 0) -> None:
    """Make ``module``'s parameters and buffers on every rank those of rank ``source``."""
    if not active():
        return
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, source)


def average_gradients(parameters: Iterable[nn.Parameter]) -> None:
    """Replace each gradient by its mean across ranks (what DDP does, in one bucket)."""
    if not active():
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
        offset += grad.numel()


def every_rank(flag: bool, device: torch.device | None = None) -> bool:
    """True when ``flag`` holds on every rank (ranks stop together at the shortest shard)."""
    if not active():
        return flag
    value = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def all_reduce_count(value: int, device: torch.device | None = None) -> int:
    """The sum of ``value`` over ranks."""
    if not active():
        return value
    tensor = torch.tensor([value], device=device)
    dist.all_reduce(tensor)
    return int(tensor.item())


def min_over_ranks(value: int, device: torch.device | None = None) -> int:
    """The smallest ``value`` any rank holds (e.g. the number of batches of the shortest shard)."""
    if not active():
        return value
    tensor = torch.tensor([value], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return int(tensor.item())


def collective_device(module: nn.Module) -> torch.device:
    """Where collectives' tensors live: the model's device (NCCL needs CUDA tensors)."""
    parameter = next(module.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def progress_enabled(progress: bool | None) -> bool:
    """``progress`` on rank 0; ``None`` (auto): only on a terminal, and never under pytest."""
    if rank() != 0:
        return False
    if progress is None:
        return sys.stderr.isatty() and "PYTEST_CURRENT_TEST" not in os.environ
    return bool(progress)


def progress_bar(iterable: Iterable[T], progress: bool | None, **options: Any) -> Iterator[T] | Any:
    """A tqdm bar over ``iterable`` when ``progress_enabled(progress)``, else ``iterable``."""
    if not progress_enabled(progress):
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, dynamic_ncols=True, leave=False, **options)
