"""``ghostify.tune.layer_statistics``: the sums of the original model's layers in one pass, the same
as each layer's own statistics on inputs caught separately, split into passes by the budget."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import ghostify
from ghostify import Calibration, ConfigError, GhostModule, fit
from ghostify.errors import CalibrationMemoryError
from ghostify.fit.statistics import WORKSPACE_BYTES, LayerStatistics
from ghostify.tune import layer_statistics


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 24, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.Conv2d(24, 8, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    ).eval()


def _data() -> torch.Tensor:
    return torch.randn(40, 3, 12, 12, generator=torch.Generator().manual_seed(1))


def _inputs_of(model: nn.Module, name: str, data: torch.Tensor) -> torch.Tensor:
    seen: list[torch.Tensor] = []
    handle = model.get_submodule(name).register_forward_pre_hook(lambda _m, a: seen.append(a[0]))
    with torch.no_grad():
        model(data)
    handle.remove()
    return seen[0]


# The second budget holds one layer's sums at a time: two passes.
@pytest.mark.parametrize("budget", [None, WORKSPACE_BYTES + 300_000])
def test_sums_are_each_layers_own_on_its_inputs(budget: int | None) -> None:
    model, data = _model(), _data()
    before = copy.deepcopy(model.state_dict())
    calibration = Calibration(data, batch_size=16, layout_positions=300, memory_budget=budget)
    names = ["3", "5"]
    got = layer_statistics(model, names, calibration, dw_size=3, refit_intrinsic=True)
    assert list(got) == names
    for name in names:
        conv = model.get_submodule(name)
        want = LayerStatistics(
            conv, dw_size=3, refit_intrinsic=True, sampling=calibration.sampling(name, conv, 40)
        )
        for inputs in _inputs_of(model, name, data).split(16):  # the conv's own batches
            want.update(inputs)
        for a, b in zip(got[name].tensors(), want.tensors(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_a_ghost_fitted_from_them_is_the_ghost_fitted_on_the_inputs() -> None:
    model, data = _model(), _data()
    conv = model.get_submodule("3")
    stats = layer_statistics(model, ["3"], Calibration(data, layout_positions=None))["3"]
    from_sums = fit(conv, GhostModule.like(conv), stats)
    direct = fit(conv, GhostModule.like(conv), _inputs_of(model, "3", data))
    assert torch.equal(from_sums.output_position, direct.output_position)
    for a, b in zip(from_sums.parameters(), direct.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_budget_below_one_layers_sums_is_refused_before_the_pass() -> None:
    model, data = _model(), _data()
    calls = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    with pytest.raises(CalibrationMemoryError, match=r"'3' needs at least .* memory_budget is"):
        layer_statistics(model, ["3"], Calibration(data, memory_budget=10_000))
    assert len(calls) == 1  # only the check of the first batch ran


def test_names_that_are_not_convolutions_are_named() -> None:
    model, data = _model(), _data()
    with pytest.raises(ConfigError, match="'1' is a BatchNorm2d, not a convolution"):
        layer_statistics(model, ["1"], data)
    with pytest.raises(ConfigError, match="'9' is no module"):
        layer_statistics(model, ["9"], data)
    wide = nn.Sequential(nn.Conv2d(3, 2048, 1))
    with pytest.raises(ConfigError, match="too many to choose a layout"):
        layer_statistics(wide, ["0"], torch.randn(2, 3, 4, 4))
    assert ghostify.tune.layer_statistics is layer_statistics
