"""The per-layer timing database: how long each form of a layer takes on the input it sees.

``TimingDatabase.time`` takes the alternatives for one layer (its forms, each named by a key that
describes it completely) and one input shape, and returns each form's milliseconds per call in
the database's runtime. Forms already timed in this environment (``environment.py``) come from the
disk cache (``cache.py``) without building anything; the others are built, timed together
(``measure.py``: interleaved, repeated, the least disturbed sample) and cached.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from .cache import TimingCache
from .environment import environment
from .measure import DEFAULT_MIN_SAMPLE_MS, DEFAULT_ROUNDS, STATISTICS, time_interleaved
from .runtimes import check_layout, check_runtime, runner

# A form to time: a module, or a function that builds it (called only when not cached).
FormSource = nn.Module | Callable[[], nn.Module]


def module_key(module: nn.Module) -> str:
    """A key describing ``module``'s computation for timing: its class, its printed structure
    (every layer's configuration), and the shape and dtype of every parameter and buffer. Weight
    values are left out: they do not change a layer's time."""
    tensors = [
        (name, tuple(t.shape), str(t.dtype))
        for name, t in [*module.named_parameters(), *module.named_buffers()]
    ]
    text = f"{type(module).__module__}.{type(module).__qualname__}|{module!r}|{tensors!r}"
    return "module:" + hashlib.sha1(text.encode()).hexdigest()[:20]


def entry_key(form: str, input_shape: Sequence[int], dtype: torch.dtype, layout: str) -> str:
    """The cache key of ``form`` timed on ``input_shape`` in ``dtype`` and ``layout``."""
    return f"{form}|{'x'.join(map(str, input_shape))}|{str(dtype).removeprefix('torch.')}|{layout}"


class TimingDatabase:
    """Per-layer timings in one runtime on one device, cached on disk.

    ``runtime``: ``"eager"`` (PyTorch) or ``"onnxruntime"``. ``cache``: a ``TimingCache``, a
    folder, None for the default folder (``$GHOSTIFY_TIMING_CACHE`` or
    ``~/.cache/ghostify/timing``), or False to keep timings in memory only. ``rounds`` and
    ``min_sample_ms`` and ``statistic`` (``"min"`` or ``"median"`` of the rounds) set how each
    timing is taken (see ``time_interleaved``). ``measured`` and
    ``reused`` count the forms timed and the forms read from the cache.
    """

    def __init__(
        self,
        runtime: str = "eager",
        *,
        cache: TimingCache | str | Any = None,
        device: torch.device | str = "cpu",
        rounds: int = DEFAULT_ROUNDS,
        min_sample_ms: float = DEFAULT_MIN_SAMPLE_MS,
        statistic: str = "min",
    ) -> None:
        self.runtime = check_runtime(runtime)
        if cache is False:
            cache = TimingCache(enabled=False)
        elif cache is None or cache is True:
            cache = TimingCache()
        elif not isinstance(cache, TimingCache):
            cache = TimingCache(cache)
        self.cache = cache
        self.device = torch.device(device)
        if runtime == "onnxruntime" and self.device.type != "cpu":
            raise ConfigError(
                f"ONNX Runtime is timed on the CPU here; got device {str(self.device)!r}"
            )
        if not isinstance(rounds, int) or rounds < 1:
            raise ConfigError(f"rounds must be a positive int; got {rounds!r}")
        self.rounds = rounds
        self.min_sample_ms = min_sample_ms
        if statistic not in STATISTICS:
            raise ConfigError(f"statistic must be one of {STATISTICS}; got {statistic!r}")
        self.statistic = statistic
        self.measured = 0
        self.reused = 0

    @property
    def environment(self) -> dict[str, Any]:
        return {**environment(self.runtime, self.device), "statistic": self.statistic}

    def lookup(
        self,
        form: str,
        input_shape: Sequence[int],
        *,
        dtype: torch.dtype = torch.float32,
        layout: str = "contiguous",
    ) -> float | None:
        """The cached milliseconds of ``form`` on ``input_shape``, or None (nothing is timed)."""
        key = entry_key(form, input_shape, dtype, self._layout(layout))
        return self.cache.get(self.environment, key)

    def remember(
        self,
        form: str,
        input_shape: Sequence[int],
        value: float,
        *,
        dtype: torch.dtype = torch.float32,
        layout: str = "contiguous",
    ) -> None:
        """Cache ``value`` (a positive figure measured elsewhere, e.g. a whole model's time
        ratio) as ``form`` on ``input_shape`` in this environment."""
        if not value > 0:
            raise ConfigError(f"a cached timing must be a positive number; got {value!r}")
        key = entry_key(form, input_shape, dtype, self._layout(layout))
        self.cache.put(self.environment, {key: float(value)})

    def time(
        self,
        forms: Mapping[str, FormSource],
        input_shape: Sequence[int],
        *,
        dtype: torch.dtype = torch.float32,
        layout: str = "contiguous",
    ) -> dict[str, float]:
        """Milliseconds of one call of each form on a random input of ``input_shape``.

        ``forms`` maps a key describing each form completely (e.g. ``module_key(module)``, or
        a description of the configuration it is built from) to the module or a function that
        builds it. Modules are copied, never changed; forms not cached are timed interleaved.
        """
        layout = self._layout(check_layout(layout))
        env = self.environment
        shape = tuple(int(size) for size in input_shape)
        keys = {form: entry_key(form, shape, dtype, layout) for form in forms}
        result = {form: self.cache.get(env, key) for form, key in keys.items()}
        missing = [form for form, value in result.items() if value is None]
        self.reused += len(forms) - len(missing)
        if missing:
            generator = torch.Generator().manual_seed(0)
            x = torch.randn(shape, generator=generator, dtype=torch.float32)
            x = x.to(device=self.device, dtype=dtype)
            calls = [
                runner(self._build(forms[form], dtype), (x,), self.runtime, layout)
                for form in missing
            ]
            sync = _synchronizer(self.device)
            with torch.inference_mode():
                times = time_interleaved(
                    calls,
                    rounds=self.rounds,
                    min_sample_ms=self.min_sample_ms,
                    sync=sync,
                    statistic=self.statistic,
                )
            timed = dict(zip(missing, times, strict=True))
            self.cache.put(env, {keys[form]: ms for form, ms in timed.items()})
            result.update(timed)
            self.measured += len(missing)
        return {form: float(value) for form, value in result.items()}  # type: ignore[arg-type]

    def _layout(self, layout: str) -> str:
        return layout if self.runtime == "eager" else "onnx"  # ONNX Runtime picks its own

    def _build(self, source: FormSource, dtype: torch.dtype) -> nn.Module:
        module = copy.deepcopy(source) if isinstance(source, nn.Module) else source()
        if not isinstance(module, nn.Module):
            raise ConfigError(f"a form must be a module or build one; got {type(module).__name__}")
        return module.to(device=self.device, dtype=dtype).eval()


def _synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None
