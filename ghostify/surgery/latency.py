"""Per-layer truth: is a GhostModule faster than the convolution it replaces, here?

Fewer MACs do not make every layer faster: on small feature maps, or 1x1 convolutions with few
channels, the extra depthwise pass and the concatenation can cost more than the halved dense
convolution saves. This times both forms of one layer on the input shape the layer really sees,
on the machine at hand, through the timing database (``ghostify.timing``: interleaved, repeated,
cached on disk, so a second conversion of the same architecture times nothing).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..timing import TimingDatabase, module_key
from ..timing.measure import DEFAULT_ROUNDS


@dataclass(frozen=True)
class LayerLatency:
    """Milliseconds of one call of the original layer and of its GhostModule."""

    original_ms: float
    ghost_ms: float

    @property
    def speedup(self) -> float:
        return self.original_ms / self.ghost_ms if self.ghost_ms > 0 else float("inf")


def time_layer(
    original: nn.Module,
    ghost: nn.Module,
    input_shape: tuple[int, ...],
    rounds: int = DEFAULT_ROUNDS,
    database: TimingDatabase | None = None,
) -> LayerLatency:
    """Time ``original`` and ``ghost`` (eval mode, copies) on a random input of ``input_shape``
    in ``database`` (default: eager, the default disk cache), in the layers' own dtype."""
    weight = next(original.parameters())
    database = database or TimingDatabase("eager", rounds=rounds, device=weight.device)
    forms = {module_key(original): original, module_key(ghost): ghost}
    ms = database.time(forms, input_shape, dtype=weight.dtype)
    return LayerLatency(ms[module_key(original)], ms[module_key(ghost)])
