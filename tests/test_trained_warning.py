"""``convert`` warns once when it fits a trained-looking model data-free, and only then."""

from __future__ import annotations

import warnings

import pytest
import torch
import torchvision
from torch import nn

import ghostify
from ghostify import TrainedWeightsWarning, trained_evidence

X = torch.randn(2, 3, 32, 32)


def small_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.BatchNorm2d(16)
    )


def trained_looking(model: nn.Module) -> nn.Module:
    """One forward pass in training mode: what moves BatchNorm running statistics."""
    with torch.no_grad():
        model.train()(X)
    return model.eval()


def convert_warnings(model: nn.Module, **kwargs) -> list[warnings.WarningMessage]:
    """The TrainedWeightsWarnings one convert call gives (every one, not Python's once)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ghostify.convert(model, **kwargs)
    return [w for w in caught if issubclass(w.category, TrainedWeightsWarning)]


def test_a_fresh_model_is_not_trained_and_converts_without_a_word() -> None:
    model = torchvision.models.resnet18(weights=None)
    assert trained_evidence(model) is None
    assert convert_warnings(model, include=["layer1.0.*"]) == []  # a few layers: quicker
    assert trained_evidence(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 8, 3))) is None


def test_a_trained_model_converted_data_free_warns_once_with_the_fix() -> None:
    model = trained_looking(small_net())
    evidence = trained_evidence(model)
    assert evidence is not None and "2 of its 2 BatchNorm layers" in evidence and "'1'" in evidence
    (warning,) = convert_warnings(model)
    text = str(warning.message)
    assert evidence in text
    assert "fell to" in text and "calibrated on 512 unlabeled images" in text  # the consequence
    assert "ghostify.convert(model, calibration_data=inputs)" in text  # the one line that fixes it
    assert warning.filename == __file__  # pointed at the caller's line, not ghostify's


def test_loaded_weights_count_as_trained() -> None:
    """Trained weights loaded from a file carry their BatchNorm statistics with them."""
    trained = trained_looking(small_net())
    model = small_net()
    model.load_state_dict(trained.state_dict())
    assert trained_evidence(model) is not None


def test_no_warning_where_nothing_is_lost(tmp_path) -> None:
    model = trained_looking(small_net())
    assert convert_warnings(model, init="scratch") == []  # random layers: nothing to keep
    model = trained_looking(small_net())
    assert convert_warnings(model, calibration_data=torch.randn(8, 3, 32, 32)) == []
    plan = ghostify.plan_of(model)
    state = model.state_dict()
    rebuilt = trained_looking(small_net())
    assert convert_warnings(rebuilt, plan=plan) == []  # weights come from the saved state_dict
    rebuilt.load_state_dict(state)
    other = trained_looking(small_net())
    assert len(convert_warnings(other, plan=plan, init="weights")) == 1  # a fit: data-free


def test_the_warning_can_be_silenced_by_its_category() -> None:
    model = trained_looking(small_net())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any other warning would fail the test
        warnings.filterwarnings("ignore", category=TrainedWeightsWarning)
        ghostify.convert(model)


def test_batchnorm_without_running_statistics_shows_nothing() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, track_running_stats=False))
    with torch.no_grad():
        model.train()(X)
    assert trained_evidence(model) is None


@pytest.mark.parametrize("moved", ["mean", "var", "count"])
def test_any_moved_statistic_is_evidence(moved) -> None:
    model = small_net()
    bn = model[4]
    if moved == "mean":
        bn.running_mean[3] = 0.1
    elif moved == "var":
        bn.running_var[0] = 0.5
    else:
        bn.num_batches_tracked += 1
    assert "1 of its 2 BatchNorm layers" in trained_evidence(model) and "'4'" in trained_evidence(
        model
    )
