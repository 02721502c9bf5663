"""The soft-target term for models that return probabilities or values rather than logits."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import ghostify
from ghostify import ConfigError, DistillationLoss
from ghostify.tune.distill import output_kind
from ghostify.tune.finetune import output_distance, resolve_outputs


@settings(max_examples=25, deadline=None)
@given(
    samples=st.integers(1, 4),
    classes=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
def test_probabilities_term_is_the_bernoulli_kl_divergence(
    samples: int, classes: int, seed: int
) -> None:
    generator = torch.Generator().manual_seed(seed)
    student = torch.rand(samples, classes, generator=generator).clamp(0.01, 0.99)
    teacher = torch.rand(samples, classes, generator=generator).clamp(0.01, 0.99)
    loss = DistillationLoss(outputs="probabilities")(student, teacher)
    reference = torch.distributions.kl_divergence(
        torch.distributions.Bernoulli(probs=teacher.double()),
        torch.distributions.Bernoulli(probs=student.double()),
    )
    assert float(loss) == pytest.approx(float(reference.sum() / samples), rel=1e-4, abs=1e-6)
    assert float(DistillationLoss(outputs="probabilities")(teacher, teacher)) == pytest.approx(
        0.0, abs=1e-6
    )


def test_values_term_is_the_relative_squared_error() -> None:
    teacher = torch.tensor([[3.0, -4.0]])
    student = torch.tensor([[3.0, -1.0]])  # off by 3 where |teacher| = 5
    loss = DistillationLoss(outputs="values")(student, teacher)
    assert float(loss) == pytest.approx(9 / 25)


def test_a_softmax_over_probabilities_teaches_far_less_than_their_own_divergence() -> None:
    """Why the kind matters: on outputs in [0, 1], logits' KL has a gradient ~100x weaker."""
    torch.manual_seed(0)
    teacher = torch.rand(16, 360)
    student = (teacher + 0.2 * torch.randn(16, 360)).clamp(0, 1).requires_grad_()
    gradients = {}
    for kind in ("logits", "probabilities"):
        student.grad = None
        DistillationLoss(outputs=kind)(student, teacher).backward()
        gradients[kind] = float(student.grad.norm())
    assert gradients["probabilities"] > 100 * gradients["logits"], gradients


def test_auto_takes_outputs_in_the_unit_interval_for_probabilities() -> None:
    assert output_kind("auto", torch.sigmoid(torch.randn(4, 10))) == "probabilities"
    assert output_kind("auto", torch.randn(4, 10)) == "logits"
    assert output_kind("auto", torch.zeros(4, 10)) == "logits"  # nothing says probabilities
    assert output_kind("values", torch.rand(4, 10)) == "values"  # asked for: kept
    cpu = torch.device("cpu")
    assert resolve_outputs("auto", torch.rand(4, 10), cpu) == "probabilities"
    assert resolve_outputs("auto", (torch.rand(4, 10),), cpu) == "logits"  # not one tensor


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"outputs": "softmax"}, "outputs must be one of .*'softmax'"),
        ({"outputs": "auto"}, "outputs must be one of .*'auto'"),  # resolved by finetune only
        (
            {"outputs": "probabilities", "hard_label_weight": 1.0},
            "hard_label_weight > 0 needs outputs='logits'",
        ),
    ],
)
def test_bad_output_kinds_are_named(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        DistillationLoss(**kwargs)


def sigmoid_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 40),
        nn.Sigmoid(),
    )


def test_finetune_of_a_sigmoid_model_gets_closer_with_auto_than_with_logits() -> None:
    """With plain SGD (whose steps scale with the gradient; Adam's do not) the weak gradient of
    a softmax over probabilities barely moves the model; their own divergence does."""
    torch.manual_seed(0)
    teacher = sigmoid_net().eval()
    with torch.no_grad():
        teacher[6].weight.mul_(8)  # confident outputs, as a trained detector's
    data = torch.randn(256, 1, 12, 12)
    converted = ghostify.convert(copy.deepcopy(teacher), ratio=4, progress=False)
    start = output_distance(converted, teacher, data)
    ended = {}
    for outputs in ("logits", "auto"):
        student = copy.deepcopy(converted)
        sgd = torch.optim.SGD(student.parameters(), lr=0.05)
        ghostify.finetune(
            student, data, epochs=6, teacher=teacher, optimizer=sgd, outputs=outputs, progress=False
        )
        ended[outputs] = output_distance(student, teacher, data)
    assert ended["auto"] < 0.8 * ended["logits"] and ended["auto"] < start, (start, ended)
    with pytest.raises(ConfigError, match="outputs must be one of"):
        ghostify.finetune(converted, data, outputs="sigmoid")
    with pytest.raises(ConfigError, match="outputs must be one of"):
        ghostify.Calibration(data, outputs="sigmoid")
