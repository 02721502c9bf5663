"""The last stage of a calibration: a short distillation from the original on the same data."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from . import distributed
from .data import Batch
from .distill import DistillationLoss
from .finetune import (
    cosine,
    resolve_outputs,
    shuffled,
    starting_distance,
    teacher_outputs,
    train_steps,
)
from .settings import Calibration


def distill(
    calibration: Calibration,
    model: nn.Module,
    teacher: nn.Module,
    layers: list[str],
    device: torch.device,
) -> None:
    """End-to-end distillation on the calibration data, BatchNorm statistics kept fixed.

    ``layers``: the converted layers, whose outputs the feature term compares with their
    originals' (before channel orders are folded, both are in the original order).
    """
    batches = calibration.batches
    assert batches is not None
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        return
    first = batches.first[0].to(device)
    lr = calibration.lr
    if calibration.scale_lr:
        lr *= starting_distance(model, teacher, first)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    loss_fn = DistillationLoss(
        calibration.temperature,
        feature_weight=calibration.feature_weight,
        outputs=resolve_outputs(
            calibration.outputs,
            teacher_outputs(teacher, first) if calibration.outputs == "auto" else None,
            device,
        ),
    )
    if calibration.feature_weight:
        loss_fn.watch_layers(model, teacher, layers)
    generator = torch.Generator().manual_seed(calibration.seed)
    steps = calibration.distill_steps or None

    def next_epoch() -> Iterator[Batch]:
        return iter(shuffled(batches, calibration.data, generator))

    try:
        with torch.enable_grad():
            train_steps(
                model,
                teacher,
                next_epoch,
                loss_fn,
                optimizer,
                max_steps=steps,
                max_seconds=calibration.distill_seconds,
                schedule=cosine(steps) if steps else None,
                progress=calibration.progress,
                description="distill",
                total=steps,
            )
    finally:
        loss_fn.unwatch()
    distributed.broadcast_module(model)
