"""Calibrated conversion: fit the new layers on real data, layer by layer, asymmetrically.

Stages, in the model's execution order (as seen running the first batch):

1. each converted layer is fitted on the inputs it receives in the *partially converted* model,
   with the original layer's output on the original model's inputs as the target, so every layer
   compensates the errors of the layers before it instead of compounding them ("asymmetric"
   reconstruction). Sums are accumulated batch by batch (``ghostify.fit.statistics``);
2. each BatchNorm after the first converted layer gets its running statistics re-estimated on
   the calibration data, in turn, so later layers are fitted on properly normalised inputs;
3. optionally, a short distillation from the original on the same unlabeled data, end to end,
   with the BatchNorm statistics of stage 2 kept fixed (so it is deterministic, and the same on
   one process as on many).

Under torch.distributed, every rank passes its own shard; sums are all-reduced and the fitted
layers broadcast from rank 0, so every rank ends with the same weights.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ConversionError
from ..fit.activations import fit_on_activations
from ..fit.data_driven import refit_kernels
from ..fit.statistics import MAX_PAIR_SUMS, KernelStatistics, LayerStatistics
from ..inputs import eval_mode
from ..layers.ghost_module import GhostModule
from ..surgery.graph import TracedGraph
from ..surgery.swap import Transaction
from . import distributed
from .batchnorm import set_statistics
from .data import Batch
from .distill import DistillationLoss
from .finetune import cosine, shuffled, train_steps
from .memory import default_budget
from .settings import Calibration, prepare

__all__ = ["Calibration", "Calibrator", "calibrate_conversion", "prepare", "teacher_copy"]


class _Stop(Exception):
    """Raised by a hook once the module of interest has run: the rest of the forward is skipped."""


def _collect(
    model: nn.Module, inputs: torch.Tensor, module: nn.Module, calls: int, want: str
) -> list[torch.Tensor]:
    """``module``'s input or output at each of its ``calls`` calls in ``model(inputs)``."""
    store: list[torch.Tensor] = []

    def keep(value: torch.Tensor) -> None:
        store.append(value.detach())
        if len(store) == calls:
            raise _Stop

    if want == "input":
        handle = module.register_forward_pre_hook(lambda _m, args: keep(args[0]))
    else:
        handle = module.register_forward_hook(lambda _m, _args, output: keep(output))
    try:
        with torch.no_grad():
            model(inputs)
    except _Stop:
        pass
    finally:
        handle.remove()
    if len(store) != calls:
        raise ConversionError(
            f"a {type(module).__name__} ran {len(store)} time(s) on a calibration batch but "
            f"{calls} on the first; calibration needs the same path for every batch"
        )
    return store


@dataclass
class _Unit:
    """One step of the layer-by-layer pass: fit a converted layer, or re-estimate a BatchNorm."""

    name: str
    module: nn.Module
    calls: int


def _execution_order(
    model: nn.Module, inputs: torch.Tensor, ghosts: dict[str, GhostModule]
) -> list[_Unit]:
    """Converted layers and the BatchNorms that run after the first of them, as they run."""
    names = {id(module): name for name, module in ghosts.items()}
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
            names.setdefault(id(module), name)
    order: list[int] = []
    calls: dict[int, int] = {}
    modules = {id(m): m for m in model.modules() if id(m) in names}

    def hook(module: nn.Module, _args: Any) -> None:
        if id(module) not in calls:
            order.append(id(module))
        calls[id(module)] = calls.get(id(module), 0) + 1

    handles = [m.register_forward_pre_hook(hook) for m in modules.values()]
    try:
        with torch.no_grad():
            model(inputs)
    finally:
        for handle in handles:
            handle.remove()
    first_ghost = next(
        (i for i, key in enumerate(order) if isinstance(modules[key], GhostModule)), 0
    )
    units = [_Unit(names[key], modules[key], calls[key]) for key in order[first_ghost:]]
    return [u for u in units if not isinstance(u.module, GhostModule) or u.name in ghosts]


def _following_batchnorm(name: str, graphs: list[TracedGraph], teacher: nn.Module) -> Any:
    """The BatchNorm (in ``teacher``) that alone reads layer ``name``'s output, or None."""
    for traced in graphs or []:
        sites = traced.call_sites(name)
        if len(sites) != 1:
            continue
        users = list(sites[0].users)
        if len(users) == 1 and users[0].op == "call_module":
            module = teacher.get_submodule(f"{traced.prefix}{users[0].target}")
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                return module
    return None


def _batchnorm_weights(batchnorm: Any) -> torch.Tensor | None:
    """Square of the BatchNorm's scale per channel: how much an input error still counts."""
    if batchnorm is None or batchnorm.running_var is None:
        return None
    scale = 1.0 / (batchnorm.running_var.double() + batchnorm.eps)
    if batchnorm.weight is not None:
        scale = scale * batchnorm.weight.detach().double().square()
    return scale


class Calibrator:
    """Runs the stages on a model whose layers were just swapped in (see the module docstring)."""

    def __init__(
        self,
        calibration: Calibration,
        model: nn.Module,
        teacher: nn.Module,
        ghosts: dict[str, GhostModule],
        originals: dict[str, nn.Module],
        graphs: list[TracedGraph] | None,
    ) -> None:
        assert calibration.batches is not None
        self.calibration = calibration
        self.batches = calibration.batches
        self.model = model
        self.teacher = teacher
        self.ghosts = ghosts
        self.originals = originals
        self.graphs = graphs or []
        self._cache: tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]] | None = None
        self._image_count: int | None = None
        self._done: set[int] = set()  # BatchNorms already re-estimated from a layer's cache
        self._budget = calibration.memory_budget or default_budget(self._device())

    def run(self) -> None:
        with eval_mode(self.model):
            units = _execution_order(
                self.model, self.batches.first[0].to(self._device()), self.ghosts
            )
            bar = distributed.progress_bar(
                units, self.calibration.progress, desc="calibrate", unit="layer"
            )
            for unit in bar:
                if isinstance(unit.module, GhostModule):
                    self._fit_layer(unit)
                    self._reestimate_following(unit)
                elif id(unit.module) not in self._done:
                    self._reestimate(unit)
            self._cache = None
            if self.calibration.distill_steps or self.calibration.distill_seconds:
                self._distill()

    def _device(self) -> torch.device:
        return distributed.collective_device(self.model)

    def _pairs(self, unit: _Unit) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Student inputs and teacher outputs of ``unit``'s layer, batch by batch, call by call.

        The first pass over a layer keeps them while they fit in ``cache_bytes``; later passes
        over the same layer read the cache instead of running both models again.
        """
        if self._cache is not None and self._cache[0] is unit.module:
            yield from self._cache[1]
            return
        original = self.teacher.get_submodule(unit.name)
        kept: list[tuple[torch.Tensor, torch.Tensor]] | None = []
        size = 0
        for inputs, _ in self.batches:
            student = _collect(self.model, inputs, unit.module, unit.calls, "input")
            teacher = _collect(self.teacher, inputs, original, unit.calls, "output")
            for pair in zip(student, teacher, strict=True):
                if kept is not None:
                    size += sum(t.numel() * t.element_size() for t in pair)
                    kept = kept if size <= self._budget else None
                    if kept is not None:
                        kept.append(pair)
                yield pair
        self._cache = None if kept is None else (unit.module, kept)

    def _fit_layer(self, unit: _Unit) -> None:
        ghost, original = unit.module, self.originals[unit.name]
        calibration = self.calibration
        weights = None
        if calibration.weight_by_batchnorm:
            weights = _batchnorm_weights(_following_batchnorm(unit.name, self.graphs, self.teacher))
        taps = ghost.dw_size**ghost.dims + 1
        if original.out_channels**2 * taps <= MAX_PAIR_SUMS:
            pairs = self._pairs(unit)
            first = next(pairs)
            # Refit a filter only with at least a quarter as many samples (pixels) as weights:
            # below that the ridge keeps it near the original anyway, at a high cost.
            positions = first[1][0, 0].numel() * unit.calls
            refit = calibration.refit_intrinsic and (
                4 * self._images() * positions >= original.weight[0].numel()
            )
            stats = LayerStatistics(original, ghost, refit_intrinsic=refit)
            for inputs, targets in itertools.chain([first], pairs):
                stats.update(inputs, targets)
            distributed.all_reduce_sum(stats.tensors())
            fit_on_activations(
                original,
                ghost,
                stats,
                refit_intrinsic=refit,
                intrinsic_ridge=calibration.intrinsic_ridge,
                channel_weights=weights,
            )
            if not refit:
                distributed.broadcast_module(ghost)
                return
        # The kernels of the final layout, on its own primary outputs (refitted filters, or a
        # layer too wide to choose its layout on activations: the data-free layout).
        kernels = KernelStatistics(original, ghost)
        self._accumulate(kernels, unit)
        with torch.no_grad():
            refit_kernels(kernels, ghost)
        distributed.broadcast_module(ghost)

    def _images(self) -> int:
        """Calibration samples on every rank together (counted once)."""
        if self._image_count is None:
            count = sum(len(inputs) for inputs, _ in self.batches)
            device = self._device()
            self._image_count = int(distributed.all_reduce_count(count, device))
        return self._image_count

    def _accumulate(self, stats: LayerStatistics | KernelStatistics, unit: _Unit) -> None:
        for inputs, targets in self._pairs(unit):
            stats.update(inputs, targets)
        distributed.all_reduce_sum(stats.tensors())

    @torch.no_grad()
    def _reestimate(self, unit: _Unit) -> None:
        """Running mean and (unbiased) variance of a BatchNorm's inputs over all the data."""
        inputs = (
            x
            for batch, _ in self.batches
            for x in _collect(self.model, batch, unit.module, unit.calls, "input")
        )
        set_statistics(unit.module, inputs)

    @torch.no_grad()
    def _reestimate_following(self, unit: _Unit) -> None:
        """Re-estimate the BatchNorm reading this layer alone, from the layer's cached inputs."""
        batchnorm = _following_batchnorm(unit.name, self.graphs, self.model)
        if batchnorm is None or self._cache is None or self._cache[0] is not unit.module:
            return
        if batchnorm.running_mean is None or unit.calls != 1:
            return
        set_statistics(batchnorm, (unit.module(x) for x, _ in self._cache[1]))
        self._done.add(id(batchnorm))

    def _distill(self) -> None:
        """End-to-end distillation on the calibration data, BatchNorm statistics kept fixed."""
        calibration = self.calibration
        model = self.model
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            return
        optimizer = torch.optim.AdamW(params, lr=calibration.lr, weight_decay=0.0)
        loss_fn = DistillationLoss(calibration.temperature)
        generator = torch.Generator().manual_seed(calibration.seed)
        steps = calibration.distill_steps or None

        def next_epoch() -> Iterator[Batch]:
            return iter(shuffled(self.batches, calibration.data, generator))

        with torch.enable_grad():
            train_steps(
                model,
                self.teacher,
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
        distributed.broadcast_module(model)


def teacher_copy(
    model: nn.Module, ghosts: dict[str, GhostModule], originals: dict[str, nn.Module]
) -> nn.Module:
    """A copy of ``model`` with each new layer's original in its place: the frozen teacher."""
    memo: dict[int, Any] = {id(ghosts[name]): copy.deepcopy(originals[name]) for name in ghosts}
    teacher = copy.deepcopy(model, memo)
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    return teacher.eval()


def calibrate_conversion(
    calibration: Calibration,
    model: nn.Module,
    ghosts: dict[str, GhostModule],
    originals: dict[str, nn.Module],
    graphs: list[TracedGraph] | None,
    changes: Transaction,
) -> dict[str, torch.Tensor]:
    """Calibrate ``model`` (its layers just swapped in) inside the conversion's transaction.

    Every tensor outside the new layers is remembered in ``changes`` first, so a failure anywhere
    restores every BatchNorm statistic and weight this changes. Returns, by state_dict key, the
    values as they were of those that changed: the conversion record keeps them for the teacher.
    """
    teacher = teacher_copy(model, ghosts, originals)
    ghost_ids = {id(t) for g in ghosts.values() for t in [*g.parameters(), *g.buffers()]}
    outside = {
        key: tensor
        for key, tensor in model.state_dict(keep_vars=True).items()
        if id(tensor) not in ghost_ids
    }
    before = {key: tensor.detach().clone() for key, tensor in outside.items()}
    for tensor in outside.values():
        changes.edit(tensor, lambda t: t)
    Calibrator(calibration, model, teacher, ghosts, originals, graphs).run()
    return {key: old for key, old in before.items() if not torch.equal(old, outside[key])}
