"""The settings of a calibrated conversion (``ghostify.Calibration``), checked before any work."""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..errors import ConfigError
from ..fit.statistics import Sampling
from .data import Batches
from .distill import check_outputs


@dataclass
class Calibration:
    """Data and settings of a calibrated conversion: ``convert(model, calibration_data=...)``.

    ``data``: a tensor of inputs (split into batches of ``batch_size``), a list of batches, or any
    iterable / DataLoader yielding inputs or ``(inputs, ...)`` tuples (labels are ignored). A few
    hundred images are enough. ``refit_intrinsic``: also refit the intrinsic filters (ridge
    regression towards the original filter, strength ``intrinsic_ridge``).
    ``weight_by_batchnorm``: weight each channel's error by the scale of the BatchNorm that follows
    the layer, where the model's graph shows one. ``distill_steps`` / ``distill_seconds``: a
    short distillation from the original on the same data as the last stage (AdamW, ``lr``,
    the soft-target loss of ``outputs``, logits softened at ``temperature``); either budget may
    stop it. The default ``lr`` is small: a calibrated model is already close to the original,
    and on ResNet-18/digits 100 steps at 1e-3 lowered the agreement from 99.2% to 97.5%
    (over-fitting a few hundred images). ``feature_weight``: add the converted layers' relative
    output errors against their originals to the distillation loss (``DistillationLoss``'s
    feature term; it helps where the outputs are a poor signal). ``outputs``: what the model
    returns, for the soft-target loss (``"logits"``, ``"probabilities"``, ``"values"``, or
    ``"auto"``: probabilities where the original's outputs on the first batch all lie in
    [0, 1]; ``ghostify.finetune``). ``scale_lr``: scale ``lr`` by how far the calibrated model
    still is from the original (``finetune.starting_distance``, 0.1 to 1).
    ``progress``: a tqdm bar over the layers (None: only on a terminal, never under pytest; rank
    0 only).

    ``memory_budget``: bytes the calibration may hold at once (activations kept between stages,
    statistics, solver workspace; the model and its frozen copy are not counted). None: half of
    the memory available when it starts (on CUDA: 80% of the free device memory), at least
    min(1 GiB, a tenth of the total); it follows the machine's state, so pass a budget for the
    same fit methods on every run. Each layer's
    fit method is chosen to fit in it, activations that do not fit are spilled to a temporary
    directory, and a calibration that cannot fit is refused before any change
    (``CalibrationMemoryError``).

    ``reestimate_batchnorm``: re-estimate the running statistics of every BatchNorm after the
    first converted layer (stage 2). ``stagewise``: propagate through the traced graphs (one pass
    over the data); False runs the whole model for every layer instead (the per-layer path, the
    reference it is tested against; slow).

    ``layout_positions``: output positions (over all samples) summed for each layer's layout
    statistics, drawn once per layer from ``seed`` (None: all). ``refit_positions_per_weight``:
    positions per filter weight for the input Gram of the intrinsic refit (None: all). Both only
    subsample where the data has more positions; the cheap kernels always use every position.
    """

    data: Any
    batch_size: int = 64
    refit_intrinsic: bool = True
    intrinsic_ridge: float = 0.05
    weight_by_batchnorm: bool = True
    distill_steps: int = 0
    distill_seconds: float | None = None
    lr: float = 1e-4
    temperature: float = 4.0
    feature_weight: float = 0.0
    outputs: str = "auto"
    scale_lr: bool = False
    seed: int = 0
    progress: bool | None = None
    memory_budget: int | None = None
    layout_positions: int | None = 8192
    refit_positions_per_weight: int | None = 4
    reestimate_batchnorm: bool = True
    stagewise: bool = True
    batches: Batches | None = field(default=None, init=False, repr=False)
    summary: CalibrationSummary | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        flags = ("refit_intrinsic", "weight_by_batchnorm", "reestimate_batchnorm", "stagewise")
        for name in (*flags, "scale_lr"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False; got {getattr(self, name)!r}")
        if isinstance(self.distill_steps, bool) or not isinstance(self.distill_steps, int):
            raise ConfigError(f"distill_steps must be an int >= 0; got {self.distill_steps!r}")
        if self.distill_steps < 0:
            raise ConfigError(f"distill_steps must be an int >= 0; got {self.distill_steps!r}")
        weight = self.feature_weight
        if isinstance(weight, bool) or not isinstance(weight, int | float) or weight < 0:
            raise ConfigError(f"feature_weight must be a number >= 0; got {weight!r}")
        for name in ("intrinsic_ridge", "lr", "temperature"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ConfigError(f"{name} must be a number > 0; got {value!r}")
        check_outputs(self.outputs)
        seconds = self.distill_seconds
        if seconds is not None and (not isinstance(seconds, int | float) or seconds < 0):
            raise ConfigError(f"distill_seconds must be a number >= 0 or None; got {seconds!r}")
        for name in ("memory_budget", "layout_positions", "refit_positions_per_weight"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ConfigError(f"{name} must be a positive int or None; got {value!r}")

    def sampling(self, name: str, original: nn.Module, samples: int) -> Sampling:
        """Positions per sample for layer ``name``'s sums, ``samples`` samples on every rank."""

        def per_sample(total: int | None) -> int | None:
            return None if total is None else max(1, -(-total // max(1, samples)))

        per_weight = self.refit_positions_per_weight
        weights = original.weight[0].numel() + 1
        return Sampling(
            layout=per_sample(self.layout_positions),
            inputs=per_sample(None if per_weight is None else per_weight * weights),
            seed=self.seed * 1_000_003 + zlib.crc32(name.encode()),
        )


@dataclass
class CalibrationSummary:
    """What a calibration did: each converted layer's fit (``LayerPlan``: ``method``, ``error``)
    by name, the layers the data never reached, the memory budget, the most bytes of activations
    held at once and the bytes spilled to disk."""

    layers: dict[str, Any]
    never_ran: list[str]
    budget: int
    peak_held: int
    spilled: int


def as_calibration(data: Any, model: nn.Module) -> Calibration:
    """``data`` as checked ``Calibration`` settings with batches (the model run on batch 0)."""
    calibration = data if isinstance(data, Calibration) else Calibration(data)
    calibration.batches = Batches(calibration.data, "calibration_data", calibration.batch_size)
    calibration.batches.check_model(model)
    return calibration


def prepare(model: nn.Module, data: Any, init: str | None, plan: object) -> Calibration:
    """Check ``calibration_data`` before anything is built: a clear error, the model untouched."""
    if init == "scratch" or (plan is not None and init != "weights"):
        raise ConfigError(
            "calibration_data fits the new layers to the trained ones, so it needs "
            f'init="weights" (the default without plan=); got init={init!r}'
            + (" with plan=" if plan is not None else "")
        )
    return as_calibration(data, model)
