"""What the budget predicts per layer form, checked against the thing itself: MACs and parameters
against fvcore on the built module, the data-free loss against the fitted module's effective
filters, the calibrated loss against the calibrated fit's error on the same activations."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ghostify
from ghostify.budget.choices import KEEP, Choice, choice_macs, choice_params, layer_choices
from ghostify.budget.loss import data_free_losses, statistics_losses
from ghostify.fit import fit
from ghostify.fit.statistics import LayerStatistics
from ghostify.tune import layer_statistics

CONVS = [
    (nn.Conv2d(16, 24, 3, padding=1), (2, 16, 9, 9)),
    (nn.Conv2d(12, 30, 3, stride=2, padding=1, bias=False), (1, 12, 11, 11)),
    (nn.Conv2d(16, 32, 1, groups=4), (2, 16, 7, 5)),
    (nn.Conv2d(8, 20, (3, 1), dilation=2, padding=(2, 0)), (1, 8, 10, 6)),
    (nn.Conv1d(8, 18, 5, padding=2), (3, 8, 20)),
    (nn.Conv3d(4, 12, 3, padding=1), (1, 4, 5, 6, 6)),
]


def _ghost(conv: nn.Module, choice: Choice) -> nn.Module:
    if choice.keep:
        return conv
    return ghostify.GhostModule.like(conv, ratio=choice.ratio, dw_size=choice.dw_size)


@pytest.mark.parametrize(("conv", "shape"), CONVS)
def test_macs_and_params_are_fvcores_counts_of_the_built_module(conv, shape, fvcore_macs) -> None:
    x = torch.randn(shape)
    output_shape = tuple(conv(x).shape)
    choices = layer_choices(conv, (2, 3, 4, 5), (1, 3))
    assert choices[0] == KEEP and len(choices) > 2
    for choice in choices:
        module = _ghost(conv, choice).eval()
        assert choice_macs(conv, choice, [output_shape]) == fvcore_macs(module, x)
        assert choice_params(conv, choice) == sum(p.numel() for p in module.parameters())


def test_choices_skip_forms_that_save_nothing_or_repeat_another() -> None:
    conv = nn.Conv2d(16, 8, 3, padding=1)  # ratio 4 and 5 both keep 2 of 8 channels
    labels = [c.label for c in layer_choices(conv, (2, 3, 4, 5), (1, 3))]
    assert labels == ["conv"] + [f"ghost r{r} dw{d}" for r in (2, 3, 4) for d in (1, 3)]
    pointwise_few_inputs = nn.Conv2d(2, 8, 1)  # a 3x3 cheap kernel costs more than it saves
    assert {c.dw_size for c in layer_choices(pointwise_few_inputs, (2,), (1, 3))} == {None, 1}
    assert layer_choices(nn.Conv2d(8, 8, 3, groups=8), (2, 4), (1, 3)) == [KEEP]  # depthwise


def _effective_filters(module: nn.Module, conv: nn.Conv2d, size: int) -> torch.Tensor:
    """d output[c] at the centre pixel / d input, for every channel c: sample c of one batch
    asks for channel c (the samples of a batch do not mix), so one backward gives them all."""
    channels = torch.arange(conv.out_channels)
    x = torch.zeros(len(channels), conv.in_channels, size, size, requires_grad=True)
    out = module(x)
    centre = out[channels, channels, out.shape[2] // 2, out.shape[3] // 2]
    (grad,) = torch.autograd.grad(centre.sum(), x)
    return grad.flatten(1)


@pytest.mark.parametrize(
    "conv",
    [nn.Conv2d(12, 24, 3, padding=1), nn.Conv2d(8, 16, 1, bias=False), nn.Conv2d(8, 20, 3)],
)
def test_data_free_loss_is_the_fitted_modules_relative_filter_error(conv) -> None:
    """Read from outside: the effective filters of the fitted GhostModule against the original's."""
    choices = layer_choices(conv, (2, 3, 4), (1, 3))
    losses = data_free_losses(conv, choices)
    assert losses[0] == 0.0
    size = 9
    original = _effective_filters(conv, conv, size)
    for choice, loss in zip(choices[1:], losses[1:], strict=True):
        ghost = ghostify.GhostModule.from_conv(conv, ratio=choice.ratio, dw_size=choice.dw_size)
        error = (_effective_filters(ghost, conv, size) - original).square().sum()
        assert loss == pytest.approx(float(error / original.square().sum()), rel=1e-4, abs=1e-7)


def _inputs_of(model: nn.Module, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    seen = []
    handle = layer.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        model(x)
    handle.remove()
    return seen[0]


def _net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 24, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(24, 24, 1, groups=2),
        nn.ReLU(),
    ).eval()


@pytest.mark.parametrize("name", ["2", "4"])
def test_calibrated_loss_is_the_calibrated_fits_error(name) -> None:
    """Every ratio and both cheap-kernel sizes, from one set of 3x3 sums (all positions): the
    relative output error that fit(..., activations) then gets on the same activations."""
    torch.manual_seed(0)
    model = _net()
    x = torch.randn(6, 3, 10, 10)
    conv = model.get_submodule(name)
    inputs = _inputs_of(model, conv, x)
    data = ghostify.Calibration([x[:3], x[3:]], layout_positions=None)
    sums = layer_statistics(model, [name], data, dw_size=3)[name]
    choices = layer_choices(conv, (2, 3, 4), (1, 3))
    predicted = statistics_losses(sums, conv, choices)
    target = conv(inputs).detach()
    for choice, loss in zip(choices[1:], predicted[1:], strict=True):
        ghost = ghostify.GhostModule.like(conv, ratio=choice.ratio, dw_size=choice.dw_size)
        statistics = LayerStatistics(conv, ghost)
        statistics.update(inputs)
        fit(conv, ghost, statistics)
        with torch.no_grad():
            error = (ghost(inputs) - target).square().sum() / target.square().sum()
        # The fit keeps the data-free layout where that is better on the sums: never worse.
        assert float(error) <= loss * (1 + 1e-6) + 1e-9
        if conv.groups == 1:
            assert float(error) == pytest.approx(loss, rel=1e-5)
