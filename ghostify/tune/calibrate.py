"""Calibrated conversion: fit the new layers on real data, in one pass, asymmetrically.

Stages, in the model's execution order:

1. the data is propagated through the kept fx graph(s) node by node (``propagate.py``), in the
   partially converted model (the student) and the original (the teacher) side by side. Each
   converted layer is fitted where it is reached, on the inputs it receives in the student,
   with the original layer's output in the teacher as the target, so every layer compensates the
   errors of the layers before it instead of compounding them ("asymmetric" reconstruction);
   then its outputs are computed with the fitted weights and the propagation goes on;
2. each BatchNorm after the first converted layer gets its running statistics re-estimated on
   the student's values where it is reached, before it runs, so later layers are fitted on
   properly normalised inputs;
3. optionally, a short distillation from the original on the same unlabeled data, end to end,
   with the BatchNorm statistics of stage 2 kept fixed (so it is deterministic, and the same on
   one process as on many).

The model runs over the data a fixed number of times, whatever its depth: once per traced graph
(twice per graph that is a submodule: the model up to it, in both models), plus the per-layer
path (``per_layer.py``) for the layers no graph holds. Everything is planned before the work
(``schedule.py``, ``layer_fit.plan_layer``) within ``Calibration.memory_budget``; activations
that do not fit are spilled to disk (``store.py``). Under torch.distributed, every rank passes
its own shard; sums are all-reduced and the fitted layers broadcast from rank 0, so every rank
ends with the same weights.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ..errors import ConversionError
from ..inputs import eval_mode
from ..layers.ghost_module import GhostModule
from ..progress import bar
from ..surgery.discovery import trace_graphs
from ..surgery.graph import TracedGraph
from ..surgery.swap import Transaction
from . import distributed
from .batchnorm import set_statistics
from .distill_stage import distill
from .layer_fit import ErrorSum, LayerPlan, fit_layer, plan_layer
from .memory import default_budget, refuse
from .per_layer import catch_calls, collect
from .propagate import Propagation, Roles, outputs_match, probe
from .schedule import Fallback, Segment, build_schedule
from .settings import Calibration, CalibrationSummary, prepare
from .store import Store, Values

__all__ = [
    "Calibration",
    "Calibrator",
    "batchnorm_weights",
    "calibrate_conversion",
    "following_batchnorm",
    "prepare",
    "teacher_copy",
]

_PROBE_SAMPLES = 2


def following_batchnorm(name: str, graphs: list[TracedGraph], teacher: nn.Module) -> Any:
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


def batchnorm_weights(batchnorm: Any) -> torch.Tensor | None:
    """Square of the BatchNorm's scale per channel: how much an input error still counts."""
    if batchnorm is None or batchnorm.running_var is None:
        return None
    scale = 1.0 / (batchnorm.running_var.double() + batchnorm.eps)
    if batchnorm.weight is not None:
        scale = scale * batchnorm.weight.detach().double().square()
    return scale


# The names tune/shared_layouts.py (stream) imports on its branch.
_following_batchnorm, _batchnorm_weights = following_batchnorm, batchnorm_weights


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
        fixed_layouts: frozenset[str] = frozenset(),
    ) -> None:
        assert calibration.batches is not None
        self.calibration = calibration
        self.batches = calibration.batches
        self.model = model
        self.teacher = teacher
        self.ghosts = ghosts
        self.originals = originals
        # Discovery by hooks keeps no graph: the traceable parts are traced here.
        self.graphs = graphs or trace_graphs(model)
        self.fixed_layouts = fixed_layouts
        self.device = distributed.collective_device(model)
        # Every rank plans alike (the same methods, the same collectives): the smallest budget.
        budget = calibration.memory_budget or default_budget(self.device)
        self.budget = distributed.min_over_ranks(budget, self.device)
        self.plans: dict[str, LayerPlan] = {}
        self._done: set[str] = set()  # modules the per-layer path has handled

    # -- planning, before any change --------------------------------------------------------

    def _plan(self) -> None:
        first = self.batches.first[0].to(self.device)
        # The order, call counts and shapes from a few samples (bytes scaled to a batch).
        sample = first[:_PROBE_SAMPLES].clone()
        scale = len(first) / len(sample)
        self.schedule = build_schedule(
            self.model,
            sample,
            self.ghosts,
            self.graphs,
            reestimate=self.calibration.reestimate_batchnorm,
            stagewise=self.calibration.stagewise,
        )
        local = sum(len(inputs) for inputs, _ in self.batches)
        self.samples = distributed.all_reduce_count(local, self.device)
        for step in list(self.schedule.steps):
            if isinstance(step, Segment):
                self._check_segment(step, sample, scale)
        schedule = self.schedule
        for name, ghost in self.ghosts.items():
            if name not in schedule.calls:
                continue
            original = self.originals[name]
            shape = schedule.shapes[name]
            positions = self.samples * shape.positions * schedule.calls[name]
            sampling = self.calibration.sampling(name, original, self.samples)
            per_sample = shape.positions * schedule.calls[name]
            gram = self.samples * min(per_sample, sampling.inputs or per_sample)
            self.plans[name] = plan_layer(
                name,
                original,
                ghost,
                refit=self.calibration.refit_intrinsic
                and 4 * positions >= original.weight[0].numel(),
                fixed_layout=name in self.fixed_layouts,
                budget=self.budget,
                batch_bytes=int(scale * (shape.input_bytes + 3 * shape.output_bytes)),
                positions=positions,
                gram_positions=gram,
            )
            if name in schedule.fallback:
                self.plans[name].notes.append(f"per-layer fallback: {schedule.fallback[name]}")

    def _check_segment(self, segment: Segment, sample: torch.Tensor, scale: float) -> None:
        """Run a segment's graph on a slice of the first batch: it must give its module's own
        output (else its layers take the per-layer path), and each node must fit the budget."""
        traced = segment.traced
        root = self.model.get_submodule(traced.prefix[:-1]) if traced.prefix else self.model
        try:
            if traced.prefix:
                (call,) = catch_calls(self.model, [sample], root)
            else:
                call = ((sample,), {})
            with torch.no_grad():
                sizes, got = probe(traced.graph, root, *call)
                matches = outputs_match(root(*call[0], **call[1]), got)
        except Exception:  # any failure means the graph cannot stand for the module
            matches = False
        if not distributed.every_rank(matches, self.device):
            self._demote(segment, "its traced graph does not reproduce the module's output")
            return
        node, size = max(sizes.items(), key=lambda item: item[1], default=("", 0))
        largest = int(size * scale)
        if 4 * largest > self.budget:  # a node's inputs and output, in both models
            where = traced.prefix[:-1] or "the model"
            raise refuse(
                f"{where}: {node}", 4 * largest, self.budget, "one batch of a value it computes"
            )

    def _demote(self, segment: Segment, why: str) -> None:
        schedule = self.schedule
        schedule.steps.remove(segment)
        for name in [n for n in schedule.roles if segment.traced.call_sites(n)]:
            del schedule.roles[name]
            schedule.fallback[name] = why
            kind = "fit" if name in self.ghosts else "batchnorm"
            schedule.steps.append(Fallback(name, kind, segment.position))
        schedule.steps.sort(key=lambda step: step.position)

    # -- the stages --------------------------------------------------------------------------

    def run(self) -> None:
        # No autograd: a value kept between stages must not keep the graph that made it.
        with eval_mode(self.model), torch.no_grad():
            self._plan()
            self.store = Store(self.budget)
            fits = sum(1 for name in self.plans)
            self.bar = bar(fits, "calibrating", self.calibration.progress, unit="layer")
            try:
                for step in self.schedule.steps:
                    if isinstance(step, Segment):
                        self._propagate(step)
                    elif step.kind == "fit":
                        self._fallback_fit(step.name)
                    else:
                        self._fallback_batchnorm(step.name)
            finally:
                self.bar.close()
                self.store.close()
            self.calibration.summary = CalibrationSummary(
                layers=dict(self.plans),
                never_ran=list(self.schedule.never_ran),
                budget=self.budget,
                peak_held=self.store.peak,
                spilled=self.store.spilled,
            )
        if self.calibration.distill_steps or self.calibration.distill_seconds:
            distill(self.calibration, self.model, self.teacher, list(self.ghosts), self.device)

    def _propagate(self, segment: Segment) -> None:
        traced = segment.traced
        schedule = self.schedule
        roles = Roles(
            role=schedule.roles.get,
            fit=self._fit_in_graph,
            prepare=self._prepare_in_graph,
            step=lambda name: self.bar.set_postfix_str(name, refresh=False),
        )
        if traced.prefix:
            name = traced.prefix[:-1]
            student_root = self.model.get_submodule(name)
            teacher_root = self.teacher.get_submodule(name)
            student_inputs = catch_calls(self.model, self.batches.inputs(), student_root)
            teacher_inputs = catch_calls(self.teacher, self.batches.inputs(), teacher_root)
        else:
            student_root, teacher_root = self.model, self.teacher
            student_inputs = [((inputs,), {}) for inputs in self.batches.inputs()]
            teacher_inputs = None
        propagation = Propagation(
            traced.graph, traced.prefix, student_root, teacher_root, roles, self.store
        )
        propagation.run(student_inputs, teacher_inputs)

    def _fit(self, name: str, pairs: Any) -> None:
        plan = self.plans[name]
        self.bar.set_postfix_str(name, refresh=False)
        self.store.make_room(plan.needed)
        weights = None
        if self.calibration.weight_by_batchnorm and plan.layout:
            weights = batchnorm_weights(following_batchnorm(name, self.graphs, self.teacher))
        fit_layer(
            plan,
            self.originals[name],
            self.ghosts[name],
            pairs,
            ridge=self.calibration.intrinsic_ridge,
            sampling=self.calibration.sampling(name, self.originals[name], self.samples),
            channel_weights=weights,
        )

    @torch.no_grad()
    def _fit_in_graph(self, name: str, inputs: Values, targets: Values) -> Values:
        """Fit layer ``name`` on every batch's inputs and targets; its outputs, fitted."""
        self._fit(name, lambda: zip(inputs, targets, strict=True))
        ghost = self.ghosts[name]
        outputs = Values(self.store, object())
        error = ErrorSum()
        for x, y in zip(inputs, targets, strict=True):
            out = ghost(x)
            error.add(out, y)
            outputs.append(out)
            self.store.make_room()
        self.plans[name].error = error.result(self.device)
        self.bar.update(1)
        return outputs

    @torch.no_grad()
    def _prepare_in_graph(self, name: str, inputs: Values | None) -> None:
        """Before a call in a graph: re-estimate a BatchNorm, or take the per-layer path."""
        if name in self.schedule.fallback:
            if name not in self._done:
                if name in self.ghosts:
                    self._fallback_fit(name)
                else:
                    self._fallback_batchnorm(name)
            return
        assert inputs is not None
        set_statistics(self.model.get_submodule(name), iter(inputs))

    @torch.no_grad()
    def _fallback_fit(self, name: str) -> None:
        """Fit layer ``name`` on inputs and targets caught by running both whole models."""
        self._done.add(name)
        ghost, calls = self.ghosts[name], self.schedule.calls[name]
        original = self.teacher.get_submodule(name)
        inputs, targets = Values(self.store, object()), Values(self.store, object())
        for batch in self.batches.inputs():
            for x in collect(self.model, batch, ghost, calls, "input"):
                inputs.append(x)
            for y in collect(self.teacher, batch, original, calls, "output"):
                targets.append(y)
            self.store.make_room()
        try:
            self._fit(name, lambda: zip(inputs, targets, strict=True))
            error = ErrorSum()
            for x, y in zip(inputs, targets, strict=True):
                error.add(ghost(x), y)
            self.plans[name].error = error.result(self.device)
        finally:
            inputs.release()
            targets.release()
        self.bar.update(1)

    @torch.no_grad()
    def _fallback_batchnorm(self, name: str) -> None:
        """Re-estimate a BatchNorm on the inputs of all its calls, running the whole student."""
        self._done.add(name)
        module, calls = self.model.get_submodule(name), self.schedule.calls[name]
        set_statistics(
            module,
            (
                x
                for batch in self.batches.inputs()
                for x in collect(self.model, batch, module, calls, "input")
            ),
        )


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
    *,
    fixed_layouts: frozenset[str] | set[str] = frozenset(),
) -> dict[str, torch.Tensor]:
    """Calibrate ``model`` (its layers just swapped in) inside the conversion's transaction.

    Every tensor outside the new layers is remembered in ``changes`` first, so a failure anywhere
    restores every BatchNorm statistic and weight this changes. ``fixed_layouts``: converted
    layers whose layout is shared with other layers (a residual stream): their kernels (and
    intrinsic filters) are refitted, their layout kept. Returns, by state_dict key, the values
    as they were of those that changed: the conversion record keeps them for the teacher. What
    each layer's fit did is left in ``calibration.summary``.
    """
    unknown = sorted(set(fixed_layouts) - set(ghosts))
    if unknown:
        raise ConversionError(f"fixed_layouts names layers that were not converted: {unknown}")
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
    Calibrator(
        calibration, model, teacher, ghosts, originals, graphs, frozenset(fixed_layouts)
    ).run()
    return {key: old for key, old in before.items() if not torch.equal(old, outside[key])}
