"""Per-layer truth: is a GhostModule faster than the convolution it replaces, here?

Fewer MACs do not make every layer faster: on small feature maps, or 1x1 convolutions with few
channels, the extra depthwise pass and the concatenation can cost more than the halved dense
convolution saves. This times both forms of one layer on the input shape the layer really sees,
on the machine at hand, interleaved, and takes medians.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

from ..inputs import eval_mode

DEFAULT_ROUNDS = 7


@dataclass(frozen=True)
class LayerLatency:
    """Median milliseconds of one call of the original layer and of its GhostModule."""

    original_ms: float
    ghost_ms: float

    @property
    def speedup(self) -> float:
        return self.original_ms / self.ghost_ms if self.ghost_ms > 0 else float("inf")


@torch.no_grad()
def time_layer(
    original: nn.Module,
    ghost: nn.Module,
    input_shape: tuple[int, ...],
    rounds: int = DEFAULT_ROUNDS,
) -> LayerLatency:
    """Time ``original`` and ``ghost`` on a random input of ``input_shape`` (eval mode)."""
    weight = next(original.parameters())
    x = torch.randn(input_shape, device=weight.device, dtype=weight.dtype)
    timings: dict[int, list[float]] = {0: [], 1: []}
    with eval_mode(original), eval_mode(ghost):
        for module in (original, ghost):  # warm-up: kernel choice, allocations
            module(x)
        for _ in range(rounds):
            for index, module in enumerate((original, ghost)):
                _sync(x)
                start = time.perf_counter()
                module(x)
                _sync(x)
                timings[index].append(time.perf_counter() - start)
    return LayerLatency(1000 * statistics.median(timings[0]), 1000 * statistics.median(timings[1]))


def _sync(x: torch.Tensor) -> None:
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
