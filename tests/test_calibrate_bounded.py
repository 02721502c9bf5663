"""The bounded intrinsic refit (conjugate gradients over the stored inputs, no input Gram): the
exact ridge solution where both fit, chosen by the budget, and spilled activations change
nothing."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import ghostify
from ghostify import Calibration
from ghostify.fit.data_driven import refit_filters
from ghostify.fit.ridge_cg import refit_filters_cg
from ghostify.fit.statistics import InputStatistics

# A fixed budget: the default follows the memory available, which moves on a shared box,
# and with it the fit methods the plan picks.
GIB = 2**30


def frames(n: int, channels: int, length: int, seed: int) -> torch.Tensor:
    """(N, C, T, 1) frames correlated in time, like audio features."""
    x = torch.randn(n, channels, length, 1, generator=torch.Generator().manual_seed(seed))
    return x.cumsum(2) / length**0.5


@pytest.mark.parametrize(
    ("conv", "shape"),
    [
        (nn.Conv2d(16, 24, (8, 1), bias=False), (40, 16, 24, 1)),
        (nn.Conv2d(12, 16, 3, padding=1, groups=4, padding_mode="reflect"), (24, 12, 9, 9)),
        (nn.Conv1d(8, 12, 5, stride=2, dilation=2), (24, 8, 40)),
    ],
)
def test_conjugate_gradients_reach_the_exact_ridge_solution(conv: nn.Module, shape) -> None:
    torch.manual_seed(0)
    x = torch.randn(*shape).cumsum(2) / shape[2] ** 0.5
    with torch.no_grad():
        y = conv(x) * 0.9 + 0.2 * conv(x).std() * torch.randn_like(conv(x))
    batches = list(zip(x.split(10), y.split(10), strict=True))
    sums = InputStatistics(conv)
    for inputs, targets in batches:
        sums.update(inputs, targets)
    exact = refit_filters(sums, conv, 0.05)
    bounded = refit_filters_cg(
        conv, lambda: iter(batches), 0.05, tolerance=1e-5, max_iterations=300
    )
    assert bounded.relative_residual <= 1e-5
    torch.testing.assert_close(bounded.weight, exact.weight, rtol=1e-3, atol=1e-4)
    if conv.bias is not None:
        torch.testing.assert_close(bounded.bias, exact.bias, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(bounded.residual, exact.residual, rtol=1e-4, atol=1e-3)


def audio_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(8, 64, (3, 1), padding=(1, 0)),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.Conv2d(64, 32, (16, 1)),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Conv2d(32, 32, (3, 1), padding=(1, 0)),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )


def trained(model: nn.Module, data: torch.Tensor) -> nn.Module:
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None
    with torch.no_grad():
        model.train()(data)
    return model.eval()


def test_a_budget_without_room_for_the_input_gram_takes_conjugate_gradients() -> None:
    data = frames(48, 8, 40, seed=1)
    model = trained(audio_net(), data)
    exact = Calibration(data, batch_size=16, memory_budget=GIB)
    ghostify.convert(copy.deepcopy(model), calibration_data=exact)
    plan = exact.summary.layers["3"]
    assert plan.method == "exact"
    # Just below what the exact solve needs: the layer takes the bounded method, the rest stays.
    bounded = Calibration(data, batch_size=16, memory_budget=plan.needed - 1)
    ghostify.convert(copy.deepcopy(model), calibration_data=bounded)
    method = bounded.summary.layers["3"].method
    assert method.startswith("bounded: conjugate gradients; ") and "the input Gram needs" in method
    assert bounded.summary.layers["6"].method == "exact"
    assert bounded.summary.layers["3"].error == pytest.approx(plan.error, rel=0.02)


def test_activations_spilled_to_disk_give_the_same_weights() -> None:
    data = frames(48, 8, 40, seed=1)
    model = trained(audio_net(), data)
    held = Calibration(data, batch_size=8, memory_budget=GIB)
    spilled = Calibration(data, batch_size=8, memory_budget=None)
    results = []
    for calibration in (held, spilled):
        if calibration is spilled:  # room for one layer's fit and little else
            calibration.memory_budget = max(p.needed for p in held.summary.layers.values())
        results.append(ghostify.convert(copy.deepcopy(model), calibration_data=calibration))
    assert held.summary.spilled == 0 and spilled.summary.spilled > 0
    assert spilled.summary.peak_held <= spilled.memory_budget
    for (key, a), b in zip(
        results[0].state_dict().items(), results[1].state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), key
