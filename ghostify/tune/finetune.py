"""``finetune``: a small distillation loop for users without one of their own.

The teacher is the original model, rebuilt from the conversion record
(``ghostify.original_model``). Batches are inputs or ``(inputs, labels)``; labels are used only
with ``hard_label_weight > 0``, so unlabeled data works. Under ``torchrun`` every rank reads its
own shard, gradients are averaged across ranks each step (as DDP does) and the ranks stop
together at the shortest shard, so every rank ends with the same weights.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..inputs import eval_mode
from ..surgery.record import original_model
from . import distributed
from .batchnorm import batchnorms
from .batchnorm import reestimate_batchnorm as set_batchnorm_statistics
from .data import Batch, Batches
from .distill import DistillationLoss, check_outputs, output_kind


def _count(value: object, name: str, allow_none: bool = True) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{name} must be an int >= 0; got {value!r}")
    return value


def shuffled(batches: Batches, data: Any, generator: torch.Generator) -> Iterator[Batch]:
    """The batches of one epoch: a tensor's samples reshuffled each epoch, others as given."""
    if not isinstance(data, torch.Tensor):
        yield from batches
        return
    order = torch.randperm(len(data), generator=generator)
    size = len(batches.first[0])
    for start in range(0, len(data), size):
        inputs = data[order[start : start + size]]
        yield (inputs if batches.device is None else inputs.to(batches.device)), None


def train_steps(
    student: nn.Module,
    teacher: nn.Module,
    epochs: Callable[[], Iterator[Batch]],
    loss_fn: DistillationLoss,
    optimizer: torch.optim.Optimizer,
    *,
    max_steps: int | None,
    max_seconds: float | None,
    schedule: Callable[[int], float] | None,
    progress: bool | None,
    description: str,
    total: int | None,
) -> list[float]:
    """Run distillation steps until ``epochs()`` runs dry or a budget is spent; mean loss/epoch.

    ``epochs`` returns a fresh iterator of batches per epoch, or raises StopIteration when done.
    """
    device = distributed.collective_device(student)
    params = [p for p in student.parameters() if p.requires_grad]
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    start, step, history = time.perf_counter(), 0, []
    bar = distributed.progress_bar(range(total or 0), progress, desc=description, total=total)
    bar_update = getattr(bar, "update", None)
    teacher.eval()
    while True:
        try:
            batches = epochs()
        except StopIteration:
            break
        losses = []
        while True:
            batch = next(batches, None)
            out_of_budget = (max_steps is not None and step >= max_steps) or (
                max_seconds is not None and time.perf_counter() - start >= max_seconds
            )
            if not distributed.every_rank(batch is not None and not out_of_budget, device):
                break
            inputs, labels = batch
            if schedule is not None:
                for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
                    group["lr"] = base * schedule(step)
            with torch.no_grad():
                teacher_logits = teacher(inputs)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(student(inputs), teacher_logits, labels)
            loss.backward()
            distributed.average_gradients(params)
            optimizer.step()
            losses.append(float(loss.detach()))
            step += 1
            if bar_update is not None:
                bar_update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
        history.append(sum(losses) / max(1, len(losses)))
        if not losses or (max_steps is not None and step >= max_steps):
            break
        if max_seconds is not None and time.perf_counter() - start >= max_seconds:
            break
    if bar_update is not None:
        bar.close()
    return history


def cosine(total: int) -> Callable[[int], float]:
    """Cosine decay from 1 to 0 over ``total`` steps."""
    return lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / max(1, total)))


# A run that ends this much further from the teacher than it started is worth a warning.
WORSE_BY = 1.05


def finetune(
    model: nn.Module,
    data: Any,
    epochs: int = 1,
    *,
    teacher: nn.Module | None = None,
    lr: float = 1e-3,
    scale_lr: bool = True,
    weight_decay: float = 0.0,
    optimizer: torch.optim.Optimizer | None = None,
    temperature: float = 4.0,
    hard_label_weight: float = 0.0,
    feature_weight: float = 0.0,
    batch_size: int = 64,
    max_steps: int | None = None,
    max_seconds: float | None = None,
    seed: int = 0,
    progress: bool | None = None,
    reestimate_batchnorm: bool = True,
    outputs: str = "auto",
    batchnorm: str = "train",
) -> list[float]:
    """Fine-tune a converted ``model`` in place by distillation from the original; mean losses.

    ``data``: a tensor of inputs (shuffled each epoch with ``seed``, in batches of
    ``batch_size``), a list of batches, or any iterable / DataLoader of inputs or
    ``(inputs, labels)``. ``teacher`` defaults to ``ghostify.original_model(model)``. The
    default optimizer is AdamW(``lr``, ``weight_decay``) with a cosine decay over the run when
    its length is known. With ``scale_lr``, ``lr`` is scaled by how far the model starts from
    the teacher (``starting_distance``, between 0.1 and 1): Adam moves every weight by about
    ``lr`` per step whatever the gradient, so a model that already matches its teacher (a
    calibrated conversion) would be pushed off it by a full-size lr, while one that starts far
    (``init="scratch"``) gets all of it. Training runs in train mode. ``batchnorm="train"``
    (default): BatchNorms normalise with each batch's statistics, and afterwards
    (``reestimate_batchnorm``) one more pass over ``data`` sets their running statistics to the
    exact statistics of their inputs, since a short run leaves them lagging behind the weights.
    ``"frozen"``: they normalise with their running statistics throughout, set first by such a
    pass, so the weights are trained for the function that is evaluated; for batches too small
    for reliable batch statistics. (Measured: better on a calibrated CREPE full, worse on the
    digits CNN at lr 3e-3, where the weights move far; see the guide to trained models.) A run
    that ends further from the teacher than it started (relative output error on the first
    batch, up by more than 5%) warns with a ``RuntimeWarning``.
    ``outputs``: what the model returns, for the soft-target loss (``DistillationLoss``):
    ``"logits"``, ``"probabilities"`` (independent, in [0, 1]: sigmoid outputs), ``"values"``
    (a regression) or ``"auto"``: probabilities where the teacher's outputs on the first batch
    all lie in [0, 1], logits otherwise. Returns the mean loss of each epoch.
    """
    epochs = _count(epochs, "epochs", allow_none=False)
    max_steps = _count(max_steps, "max_steps")
    if max_seconds is not None and (not isinstance(max_seconds, int | float) or max_seconds < 0):
        raise ConfigError(f"max_seconds must be a number >= 0; got {max_seconds!r}")
    check_outputs(outputs)
    if batchnorm not in ("frozen", "train"):
        raise ConfigError(f"batchnorm must be 'frozen' or 'train'; got {batchnorm!r}")
    batches = Batches(data, "data", batch_size)
    if teacher is None:
        teacher = original_model(model)
    batches.check_model(model)
    distributed.broadcast_module(model)
    first = batches.first[0].to(batches.device)
    reference = teacher_outputs(teacher, first)
    loss_fn = DistillationLoss(
        temperature,
        hard_label_weight=hard_label_weight,
        feature_weight=feature_weight,
        outputs=resolve_outputs(outputs, reference, distributed.collective_device(model)),
    )
    before = output_distance(model, teacher, first, reference)
    if optimizer is None:
        if scale_lr:
            lr *= _clamped(before)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    steps = _planned_steps(batches, epochs, max_steps)
    if steps is not None:  # every rank follows the same schedule: that of the shortest shard
        steps = distributed.min_over_ranks(steps, distributed.collective_device(model))
    if feature_weight:
        loss_fn.watch(model, teacher)
    generator = torch.Generator().manual_seed(seed)
    remaining = [epochs]

    def next_epoch() -> Iterator[Batch]:
        if remaining[0] == 0:
            raise StopIteration
        remaining[0] -= 1
        return iter(shuffled(batches, data, generator))

    flags = [(module, module.training) for module in [*model.modules(), *teacher.modules()]]
    try:
        if reestimate_batchnorm and batchnorm == "frozen":
            set_batchnorm_statistics(model, batches.inputs())
        model.train()
        if batchnorm == "frozen":
            for module in batchnorms(model):
                module.eval()
        history = train_steps(
            model,
            teacher,
            next_epoch,
            loss_fn,
            optimizer,
            max_steps=max_steps,
            max_seconds=max_seconds,
            schedule=cosine(steps) if steps else None,
            progress=progress,
            description="finetune",
            total=steps,
        )
        if reestimate_batchnorm and batchnorm == "train":
            set_batchnorm_statistics(model, batches.inputs())
        after = output_distance(model, teacher, first, reference)
        if after > before * WORSE_BY:
            warnings.warn(
                f"finetune ended further from the teacher than it started: relative output "
                f"error {before:.3f} -> {after:.3f} on the first batch of the data it trained "
                "on. Try a smaller lr or fewer steps, or keep the model from before (deep-copy "
                "it first)",
                RuntimeWarning,
                stacklevel=2,
            )
        return history
    finally:
        loss_fn.unwatch()
        for module, training in flags:
            module.training = training


def teacher_outputs(teacher: nn.Module, inputs: torch.Tensor) -> Any:
    """``teacher(inputs)`` in eval mode, without gradients."""
    with eval_mode(teacher), torch.no_grad():
        return teacher(inputs)


def resolve_outputs(outputs: str, reference: Any, device: torch.device) -> str:
    """``outputs``, with ``"auto"`` decided from the teacher's ``reference`` outputs, the same
    on every rank (probabilities only where every rank's lie in [0, 1])."""
    if outputs != "auto":
        return output_kind(outputs)
    kind = output_kind("auto", reference) if isinstance(reference, torch.Tensor) else "logits"
    return "probabilities" if distributed.every_rank(kind == "probabilities", device) else "logits"


def output_distance(
    model: nn.Module, teacher: nn.Module, inputs: torch.Tensor, reference: Any = None
) -> float:
    """``||model(x) - teacher(x)|| / ||teacher(x)||`` in eval mode, over every rank's inputs;
    ``reference``: ``teacher(x)`` where the caller has it already."""
    if reference is None:
        reference = teacher_outputs(teacher, inputs)
    with eval_mode(model), torch.no_grad():
        wanted = reference.float()
        error = model(inputs).float() - wanted
    sums = torch.stack([error.square().sum(), wanted.square().sum()])
    distributed.all_reduce_sum([sums])
    return float((sums[0] / sums[1].clamp_min(1e-12)).sqrt())


def starting_distance(model: nn.Module, teacher: nn.Module, inputs: torch.Tensor) -> float:
    """Relative error of ``model``'s outputs against ``teacher``'s on ``inputs``, in [0.1, 1].

    ``||model(x) - teacher(x)|| / ||teacher(x)||`` in eval mode, summed over every rank's
    ``inputs`` so every rank gets the same figure. Below 0.1 the model is treated as 0.1 away,
    so the fine-tuning still moves it.
    """
    return _clamped(output_distance(model, teacher, inputs))


def _clamped(distance: float) -> float:
    return min(1.0, max(0.1, distance))


def _planned_steps(batches: Batches, epochs: int, max_steps: int | None) -> int | None:
    try:
        per_epoch = len(batches)
    except TypeError:
        return max_steps
    planned = per_epoch * epochs
    return planned if max_steps is None else min(planned, max_steps)
