"""``DistillationLoss``: the converted model learns from the original, in any training loop.

Three terms, each with its own weight:

- soft targets, by what the model outputs (``outputs``):
  ``"logits"`` (Hinton et al., 2015): ``T^2 * KL(softmax(teacher / T) || softmax(student / T))``,
  averaged over samples (and positions, for dense outputs with classes on dim 1);
  ``"probabilities"`` (independent probabilities in [0, 1], e.g. after a sigmoid): the Bernoulli
  KL divergence of each output, summed over dim 1 and averaged like the above (a softmax over
  values in [0, 1] is nearly flat: its gradient is about a hundred times weaker);
  ``"values"`` (a regression): ``|student - teacher|^2 / |teacher|^2``;
- hard labels: cross-entropy with the labels, when given (logits only);
- features: for each watched layer, ``|student - teacher|^2 / |teacher|^2`` between the
  converted layer's output and the original layer's output, averaged over layers.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, GhostifyError
from ..surgery.record import record_of

OUTPUTS = ("logits", "probabilities", "values")
# Probabilities are clamped this far from 0 and 1 before their logarithms are taken.
EPSILON = 1e-6


def check_outputs(outputs: object) -> str:
    """``outputs`` if it is one of ``OUTPUTS`` or ``"auto"``; a ConfigError otherwise."""
    if outputs not in (*OUTPUTS, "auto"):
        raise ConfigError(f"outputs must be one of {[*OUTPUTS, 'auto']}; got {outputs!r}")
    return str(outputs)


def output_kind(outputs: str, teacher_outputs: torch.Tensor | None = None) -> str:
    """``outputs`` checked; ``"auto"`` resolved from a batch of the teacher's outputs.

    Outputs that all lie in [0, 1] are taken as probabilities, anything else as logits (a
    regression must say ``"values"``).
    """
    if check_outputs(outputs) == "auto":
        if teacher_outputs is None:
            raise ConfigError('outputs="auto" needs a batch of the teacher\'s outputs')
        lowest, highest = teacher_outputs.min(), teacher_outputs.max()
        inside = bool(lowest >= 0) and bool(highest <= 1) and bool(highest > 0)
        return "probabilities" if inside else "logits"
    return outputs


def _non_negative(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ConfigError(f"{name} must be a number >= 0; got {value!r}")
    return float(value)


class DistillationLoss(nn.Module):
    """Distillation loss of a converted model (student) against the original (teacher).

    ``loss(student_logits, teacher_logits, labels=None)``. For the feature term, call
    ``watch(student, teacher)`` once: it hooks every converted layer and its original, and each
    call of the loss then uses (and clears) the outputs captured since the last call.
    """

    def __init__(
        self,
        temperature: float = 4.0,
        *,
        soft_weight: float = 1.0,
        hard_label_weight: float = 0.0,
        feature_weight: float = 0.0,
        outputs: str = "logits",
    ) -> None:
        super().__init__()
        if outputs not in OUTPUTS:
            raise ConfigError(f"outputs must be one of {list(OUTPUTS)}; got {outputs!r}")
        self.outputs = outputs
        if isinstance(temperature, bool) or not isinstance(temperature, int | float):
            raise ConfigError(f"temperature must be a number > 0; got {temperature!r}")
        if temperature <= 0:
            raise ConfigError(f"temperature must be a number > 0; got {temperature!r}")
        self.temperature = float(temperature)
        self.soft_weight = _non_negative(soft_weight, "soft_weight")
        self.hard_label_weight = _non_negative(hard_label_weight, "hard_label_weight")
        self.feature_weight = _non_negative(feature_weight, "feature_weight")
        if self.hard_label_weight and outputs != "logits":
            raise ConfigError(
                f"hard_label_weight > 0 needs outputs='logits' (cross-entropy with the labels); "
                f"got outputs={outputs!r}"
            )
        self._student_features: dict[str, list[torch.Tensor]] = {}
        self._teacher_features: dict[str, list[torch.Tensor]] = {}
        self._orders: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []

    def extra_repr(self) -> str:
        return (
            f"outputs={self.outputs!r}, temperature={self.temperature}, "
            f"soft_weight={self.soft_weight}, hard_label_weight={self.hard_label_weight}, "
            f"feature_weight={self.feature_weight}"
        )

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if student_logits.shape != teacher_logits.shape:
            raise ConfigError(
                f"student and teacher logits differ in shape: {tuple(student_logits.shape)} vs "
                f"{tuple(teacher_logits.shape)}"
            )
        loss = student_logits.new_zeros(())
        if self.soft_weight:
            loss = loss + self.soft_weight * self.soft_loss(student_logits, teacher_logits)
        if self.hard_label_weight and labels is not None:
            loss = loss + self.hard_label_weight * F.cross_entropy(student_logits, labels)
        if self.feature_weight:
            loss = loss + self.feature_weight * self.feature_loss()
        return loss

    def soft_loss(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """The soft-target term for this loss's ``outputs`` (module docstring)."""
        teacher_logits = teacher_logits.detach()
        if self.outputs == "values":
            error = (student_logits - teacher_logits).square().sum()
            return error / teacher_logits.square().sum().clamp_min(1e-12)
        samples = student_logits.numel() // student_logits.shape[1]
        if self.outputs == "probabilities":
            s = student_logits.clamp(EPSILON, 1 - EPSILON)
            t = teacher_logits.clamp(EPSILON, 1 - EPSILON)
            kl = t * (t.log() - s.log()) + (1 - t) * ((1 - t).log() - (1 - s).log())
            return kl.sum() / samples
        t = self.temperature
        student = F.log_softmax(student_logits / t, dim=1)
        teacher = F.log_softmax(teacher_logits / t, dim=1)
        kl = F.kl_div(student, teacher, log_target=True, reduction="sum") / samples
        return kl * t * t

    def feature_loss(self) -> torch.Tensor:
        """Mean relative squared error over the watched layers' captured outputs; then clears."""
        terms = []
        for name, outputs in self._student_features.items():
            targets = self._teacher_features.get(name, [])
            order = self._orders.get(name)
            for output, target in zip(outputs, targets, strict=False):
                if order is not None:
                    target = target.index_select(1, order.to(target.device))
                terms.append(
                    (output - target).square().sum() / target.square().sum().clamp_min(1e-12)
                )
        self._student_features.clear()
        self._teacher_features.clear()
        if not terms:
            return torch.zeros(())
        return torch.stack(terms).mean()

    def watch(self, student: nn.Module, teacher: nn.Module) -> DistillationLoss:
        """Capture the outputs of ``student``'s converted layers and ``teacher``'s originals.

        ``student`` must carry a conversion record; ``teacher`` is the original model, e.g.
        ``ghostify.original_model(student)``. Layers whose channel order was folded into their
        consumers are compared in their own order. Returns ``self``.
        """
        record = record_of(student)
        if record is None:
            raise GhostifyError("watch() needs a model converted by ghostify (it has no record)")
        orders = {  # its channel group's order, not the original
            row.name: torch.tensor(row.output_order)
            for row in record.layers
            if row.output_order is not None
        }
        return self.watch_layers(student, teacher, [row.name for row in record.layers], orders)

    def watch_layers(
        self,
        student: nn.Module,
        teacher: nn.Module,
        names: list[str],
        orders: dict[str, torch.Tensor] | None = None,
    ) -> DistillationLoss:
        """Capture the outputs of the modules called ``names`` in ``student`` and ``teacher``.

        For a model without a record yet (a calibration inside ``convert``); ``orders[name]``:
        the teacher channel at each of the student layer's output channels, where they differ.
        Returns ``self``.
        """
        self.unwatch()
        self._orders.update(orders or {})
        for name in names:
            self._handles.append(
                student.get_submodule(name).register_forward_hook(
                    self._capture(self._student_features, name, detach=False)
                )
            )
            self._handles.append(
                teacher.get_submodule(name).register_forward_hook(
                    self._capture(self._teacher_features, name, detach=True)
                )
            )
        return self

    def unwatch(self) -> None:
        """Remove the hooks ``watch`` added."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._orders.clear()
        self._student_features.clear()
        self._teacher_features.clear()

    @staticmethod
    def _capture(store: dict[str, list[torch.Tensor]], name: str, detach: bool) -> Any:
        def hook(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
            store.setdefault(name, []).append(output.detach() if detach else output)

        return hook
