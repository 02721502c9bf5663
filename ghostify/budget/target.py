"""``ghostify.Budget``: the outcome a user asks for, instead of a ratio.

``Budget(speedup=1.5)``: the converted model, deployed, runs at least 1.5x as fast as the
original's own best deployed form, measured here in the runtime asked for. ``Budget(macs=0.5)``
and ``Budget(params=0.6)``: the converted model keeps at most that fraction of the original's
MACs / parameters, counted by fvcore as ``ghostify.report`` counts them. Exactly one of the three.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError
from ..options import check_dw_size, check_ratio

RUNTIMES = ("eager", "onnxruntime")
# Which proxy weights a layer's relative output error by how much of it reaches the output.
SENSITIVITIES = ("none", "batchnorm", "probe")
DEFAULT_RATIOS = (2, 3, 4, 6, 8)
DEFAULT_DW_SIZES = (1, 3)
UNITS = {"macs": "MACs", "params": "parameters"}


@dataclass(frozen=True)
class Budget:
    """What the converted model must achieve; ``convert(model, budget=...)`` picks each layer's
    form (keep the convolution, or a GhostModule at one of ``ratios`` x ``dw_sizes``) to get
    there with the least loss.

    - ``speedup``: the original's time over the result's, measured (> 1), in ``runtime``
      (``"eager"``: PyTorch after ``ghostify.deploy``; ``"onnxruntime"``) at ``batch_size``
      (default: the example inputs' batch), each model in its own best deployed form.
    - ``macs`` / ``params``: the largest fraction (0 < f <= 1) of the original's MACs /
      parameters the result may keep (fvcore counts, as ``ghostify.report``).

    ``sensitivity``: how a layer's relative output error is weighted by how much of it reaches the
    model's output: ``"probe"`` (a gradient probe through the model; needs example inputs),
    ``"batchnorm"`` (the following BatchNorm's gain) or ``"none"``. ``verify_rounds``: how many
    times a speed-up plan may be measured and tightened. ``timing_cache``: the per-layer timing
    cache folder (None: ``$GHOSTIFY_TIMING_CACHE`` or ``~/.cache/ghostify/timing``; False: none).
    """

    speedup: float | None = None
    macs: float | None = None
    params: float | None = None
    runtime: str = "eager"
    batch_size: int | None = None
    ratios: tuple[int, ...] = DEFAULT_RATIOS
    dw_sizes: tuple[int, ...] = DEFAULT_DW_SIZES
    sensitivity: str = "probe"
    verify_rounds: int = 4
    timing_cache: Any = field(default=None, compare=False)

    def __post_init__(self) -> None:
        given = {k: v for k, v in self.targets().items() if v is not None}
        if len(given) != 1:
            what = ", ".join(f"{k}={v!r}" for k, v in given.items()) or "none"
            raise ConfigError(
                "a Budget takes exactly one of speedup=, macs= or params= (e.g. "
                f"Budget(speedup=1.5), Budget(macs=0.5)); got {what}"
            )
        ((kind, value),) = given.items()
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise ConfigError(f"Budget {kind}= must be a number; got {value!r}")
        if kind == "speedup" and value <= 1:
            raise ConfigError(
                f"Budget speedup= is the original's time over the result's and must be > 1 "
                f"(1.5 means 1.5x as fast); got {value!r}"
            )
        if kind != "speedup" and not 0 < value <= 1:
            raise ConfigError(
                f"Budget {kind}= is the largest fraction of the original's {UNITS[kind]} the "
                f"result may keep, in (0, 1] (0.5 means at most half); got {value!r}"
            )
        if self.runtime not in RUNTIMES:
            raise ConfigError(f"Budget runtime= must be one of {RUNTIMES}; got {self.runtime!r}")
        if self.batch_size is not None and (
            isinstance(self.batch_size, bool)
            or not isinstance(self.batch_size, int)
            or self.batch_size < 1
        ):
            raise ConfigError(f"Budget batch_size= must be a positive int; got {self.batch_size!r}")
        ratios = tuple(self.ratios) if isinstance(self.ratios, list | tuple) else None
        if not ratios:
            raise ConfigError(
                f"Budget ratios= must be a non-empty tuple of ints >= 2; got {self.ratios!r}"
            )
        for ratio in ratios:
            check_ratio(ratio, "Budget ratios= entry")
        dw_sizes = tuple(self.dw_sizes) if isinstance(self.dw_sizes, list | tuple) else None
        if not dw_sizes:
            raise ConfigError(
                f"Budget dw_sizes= must be a non-empty tuple of odd ints; got {self.dw_sizes!r}"
            )
        for size in dw_sizes:
            check_dw_size(size, "Budget dw_sizes= entry")
        object.__setattr__(self, "ratios", tuple(sorted(set(ratios))))
        object.__setattr__(self, "dw_sizes", tuple(sorted(set(dw_sizes))))
        if self.sensitivity not in SENSITIVITIES:
            raise ConfigError(
                f"Budget sensitivity= must be one of {SENSITIVITIES}; got {self.sensitivity!r}"
            )
        if (
            isinstance(self.verify_rounds, bool)
            or not isinstance(self.verify_rounds, int)
            or (self.verify_rounds < 1)
        ):
            raise ConfigError(
                f"Budget verify_rounds= must be an int >= 1; got {self.verify_rounds!r}"
            )

    def targets(self) -> dict[str, float | None]:
        return {"speedup": self.speedup, "macs": self.macs, "params": self.params}

    @property
    def kind(self) -> str:
        """``"speedup"``, ``"macs"`` or ``"params"``: what this budget constrains."""
        return next(k for k, v in self.targets().items() if v is not None)

    @property
    def value(self) -> float:
        return float(self.targets()[self.kind])  # type: ignore[arg-type]

    def describe(self) -> str:
        if self.kind == "speedup":
            return f"x{self.value:g} speed-up ({self.runtime})"
        return f"at most {self.value:g} of the original's {UNITS[self.kind]}"

    def to_dict(self) -> dict[str, Any]:
        return {
            self.kind: self.value,
            "runtime": self.runtime,
            "batch_size": self.batch_size,
            "ratios": list(self.ratios),
            "dw_sizes": list(self.dw_sizes),
            "sensitivity": self.sensitivity,
        }
