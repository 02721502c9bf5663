"""Timing several alternatives robustly: warmed up, interleaved, repeated.

Alternatives are timed in rounds, one sample of each per round, in a rotating order, so that a
slow spell of the machine (another process, a frequency change) falls on all of them alike rather
than on whichever ran then. A sample repeats its call until it lasts ``min_sample_ms``, so a
layer that takes microseconds at batch 1 is not lost in the timer's resolution and the call
overhead.

The figure kept per alternative is a statistic of its samples' time per call: ``"min"`` by
default, since on a shared machine the noise only ever adds time (a process scheduled in, a
cache evicted), so the fastest sample is the least disturbed one; ``"median"`` is the usual
choice on an idle machine, where both agree within a few percent. Measured here with a load
average of 14 on 2 cores, six timings of one 64-channel 3x3 convolution (batch 2, 24x24) gave
medians from 0.25 to 13 ms and minima from 0.253 to 0.276 ms. A minimum is trusted once seen
twice: while some alternative's fastest sample has no second one within ``confirm`` of it, more
rounds are run (up to ``max_rounds``); on an idle machine the first ``rounds`` settle it.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable, Sequence

DEFAULT_ROUNDS = 7
DEFAULT_MIN_SAMPLE_MS = 2.0
STATISTICS = ("min", "median")
_MAX_REPEATS = 1000


def time_interleaved(
    calls: Sequence[Callable[[], object]],
    *,
    rounds: int = DEFAULT_ROUNDS,
    min_sample_ms: float = DEFAULT_MIN_SAMPLE_MS,
    warmup: int = 2,
    sync: Callable[[], object] = lambda: None,
    statistic: str = "min",
    confirm: float = 0.05,
    max_rounds: int | None = None,
) -> list[float]:
    """Milliseconds of one call of each of ``calls``, timed interleaved: the ``statistic``
    (``"min"`` or ``"median"``) of ``rounds`` samples each (for ``"min"``, more rounds up to
    ``max_rounds``, default ``3 x rounds``, until every minimum is confirmed; see above).

    ``sync`` waits for queued work (``torch.cuda.synchronize`` on a GPU) before each clock read.
    """
    if statistic not in STATISTICS:
        raise ValueError(f"statistic must be one of {STATISTICS}; got {statistic!r}")
    if not calls:
        return []
    for call in calls:  # first calls choose kernels, allocate, fill caches
        for _ in range(warmup):
            call()
    sync()
    repeats = [_repeats_for(call, min_sample_ms, sync) for call in calls]
    samples: list[list[float]] = [[] for _ in calls]
    enabled = gc.isenabled()
    gc.disable()  # a collection inside one sample would be charged to that alternative alone
    limit = max(rounds, 3 * rounds if max_rounds is None else max_rounds)
    try:
        round_index = 0
        while round_index < rounds or (
            statistic == "min" and round_index < limit and not _confirmed(samples, confirm)
        ):
            shift = round_index % len(calls)
            for index in [*range(shift, len(calls)), *range(shift)]:
                call, count = calls[index], repeats[index]
                start = time.perf_counter()
                for _ in range(count):
                    call()
                sync()
                samples[index].append((time.perf_counter() - start) / count)
            round_index += 1
    finally:
        if enabled:
            gc.enable()
    pick = min if statistic == "min" else statistics.median
    return [1000 * pick(times) for times in samples]


def _confirmed(samples: list[list[float]], tolerance: float) -> bool:
    """Whether every alternative's fastest sample has a second one within ``tolerance``."""
    for times in samples:
        fastest = min(times)
        if sum(t <= fastest * (1 + tolerance) for t in times) < 2:
            return False
    return True


def _repeats_for(
    call: Callable[[], object], min_sample_ms: float, sync: Callable[[], object]
) -> int:
    """Calls per sample so that one sample lasts about ``min_sample_ms``."""
    start = time.perf_counter()
    call()
    sync()
    once = time.perf_counter() - start
    if once <= 0:
        return _MAX_REPEATS
    return max(1, min(_MAX_REPEATS, math.ceil(min_sample_ms / 1000 / once)))
