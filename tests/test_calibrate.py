"""Fitting on real activations and calibrated conversion: better than data-free, exact where it
must be, the same batch by batch as all at once, and atomic on bad data."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import ghostify
from ghostify import Calibration, ConfigError, GhostModule, fit

# A fixed budget: the default follows the memory available, which moves on a shared box,
# and with it the fit methods the plan picks.
GIB = 2**30


@pytest.fixture(scope="module")
def trained(digits_teacher) -> tuple[nn.Sequential, tuple, dict[str, torch.Tensor]]:
    """A digits CNN trained briefly, the data, and each conv's inputs on 256 training images."""
    model, data = digits_teacher
    inputs: dict[str, torch.Tensor] = {}
    hooks = [
        module.register_forward_hook(lambda _m, args, _o, name=name: inputs.update({name: args[0]}))
        for name, module in model.named_modules()
        if isinstance(module, nn.Conv2d)
    ]
    with torch.no_grad():
        model(data[0][:256])
    for hook in hooks:
        hook.remove()
    return model, data, inputs


def relative_error(conv: nn.Module, ghost: GhostModule, x: torch.Tensor, y=None) -> float:
    with torch.no_grad():
        target = conv(x) if y is None else y
        return float((ghost(x) - target).norm() / target.norm())


@pytest.mark.parametrize("name", ["3", "7", "10"])
def test_fit_on_activations_beats_data_free_on_the_same_activations(trained, name: str) -> None:
    model, _, inputs = trained
    conv, x = model.get_submodule(name), inputs[name]
    data_free = fit(conv, GhostModule.like(conv))
    kernels_only = fit(conv, GhostModule.like(conv), x, choose="weights")
    chosen = fit(conv, GhostModule.like(conv), x)
    errors = [relative_error(conv, g, x) for g in (data_free, kernels_only, chosen)]
    # Least squares cannot do worse than the data-free kernels on the data it was fitted to, and
    # the layout is only changed when that lowers the error further.
    assert errors[1] < errors[0]
    assert errors[2] <= errors[1] + 1e-6
    assert errors[2] < 0.9 * errors[0], errors


def test_refitted_intrinsic_filters_compensate_an_upstream_error(trained) -> None:
    model, _, inputs = trained
    conv, x = model.get_submodule("7"), inputs["7"]
    target = conv(x).detach()
    noisy = x + 0.3 * x.std() * torch.randn_like(x)  # what a partially converted model feeds it
    exact = fit(conv, GhostModule.like(conv), noisy, targets=target)
    refit = fit(conv, GhostModule.like(conv), noisy, targets=target, refit_intrinsic=True)
    assert relative_error(conv, refit, noisy, target) < relative_error(conv, exact, noisy, target)


@pytest.mark.parametrize("choose", ["activations", "weights"])
def test_intrinsic_channels_are_exact_when_only_ghosts_are_fitted(trained, choose: str) -> None:
    model, _, inputs = trained
    conv, x = model.get_submodule("3"), inputs["3"]
    ghost = fit(conv, GhostModule.like(conv), x, choose=choose)
    kept = ghost.intrinsic_index
    with torch.no_grad():
        torch.testing.assert_close(ghost(x)[:, kept], conv(x)[:, kept], rtol=0, atol=1e-5)
    assert torch.equal(ghost.primary_conv.weight, conv.weight[kept])


@pytest.mark.parametrize("refit_intrinsic", [False, True])
def test_batch_by_batch_accumulation_gives_the_all_at_once_fit(trained, refit_intrinsic) -> None:
    model, _, inputs = trained
    conv, x = model.get_submodule("7"), inputs["7"]
    whole = fit(conv, GhostModule.like(conv), x, refit_intrinsic=refit_intrinsic)
    batches = fit(conv, GhostModule.like(conv), x.split(37), refit_intrinsic=refit_intrinsic)
    assert torch.equal(whole.output_position, batches.output_position)  # same layout
    for a, b in zip(whole.parameters(), batches.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)  # float32 sums


def test_channel_weights_must_match_the_layer(trained) -> None:
    model, _, inputs = trained
    conv = model.get_submodule("3")
    with pytest.raises(ConfigError, match="channel_weights must be 64"):
        fit(conv, GhostModule.like(conv), inputs["3"], channel_weights=torch.ones(3))


def agreement(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    a.eval()
    b.eval()
    with torch.no_grad():
        return float((a(x).argmax(dim=1) == b(x).argmax(dim=1)).float().mean())


def test_calibrated_conversion_agrees_with_the_teacher_far_better(trained) -> None:
    model, (train_x, _, test_x, _), _ = trained
    data_free = ghostify.convert(copy.deepcopy(model))
    calibrated = ghostify.convert(copy.deepcopy(model), calibration_data=train_x[:256])
    plain = agreement(model, data_free, test_x)
    better = agreement(model, calibrated, test_x)
    assert better > 0.9 and better > plain + 0.2, (plain, better)
    # The BatchNorm after a converted layer now describes the new layer's outputs.
    assert not torch.equal(calibrated[4].running_var, model[4].running_var)
    # The teacher is still the original, and the conversion record keeps it.
    assert agreement(model, ghostify.original_model(calibrated), test_x) == 1.0


def test_calibration_is_deterministic(trained) -> None:
    model, (train_x, *_), _ = trained
    runs = [
        ghostify.convert(
            copy.deepcopy(model),
            ratio=4,
            calibration_data=Calibration(
                list(train_x[:128].split(32)), distill_steps=2, memory_budget=GIB
            ),
        ).state_dict()
        for _ in range(2)
    ]
    assert runs[0].keys() == runs[1].keys()
    for key in runs[0]:
        assert torch.equal(runs[0][key], runs[1][key]), key


def _untouched(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    assert not any(isinstance(m, GhostModule) for m in model.modules())
    assert ghostify.record_of(model) is None
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([], "calibration_data is empty"),
        (iter([]), "calibration_data is empty"),
        (torch.zeros(0, 1, 8, 8), "has no sample"),
        (torch.randn(16, 3, 8, 8), r"rejected calibration_data batch 0 \(a 4-D float32 tensor"),
        (torch.arange(10), "looks like labels"),
        ([torch.arange(10)], "looks like labels"),
        ([{"image": torch.randn(2, 1, 8, 8)}], "batch 0 is a dict"),
        ("images/", "got a str"),
    ],
)
def test_bad_calibration_data_is_named_and_model_untouched(trained, data, message) -> None:
    model, *_ = trained
    model = copy.deepcopy(model)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ConfigError, match=message):
        ghostify.convert(model, calibration_data=data)
    _untouched(model, before)


def test_calibration_with_scratch_init_or_bad_settings_is_refused(trained) -> None:
    model, (train_x, *_), _ = trained
    with pytest.raises(ConfigError, match="distill_steps must be an int >= 0; got -1"):
        Calibration(train_x[:8], distill_steps=-1)
    with pytest.raises(ConfigError, match='needs init="weights"'):
        ghostify.convert(copy.deepcopy(model), init="scratch", calibration_data=train_x[:8])


def test_failure_during_calibration_rolls_everything_back(trained) -> None:
    model, (train_x, *_), _ = trained
    model = copy.deepcopy(model)
    before = copy.deepcopy(model.state_dict())
    # The first batch passes the early check; the third has the wrong number of channels.
    batches = [train_x[:32], train_x[32:64], torch.randn(32, 3, 8, 8)]
    with pytest.raises(RuntimeError):
        ghostify.convert(model, calibration_data=Calibration(batches, distill_steps=3))
    _untouched(model, before)


def test_the_distillation_stage_can_add_the_feature_term(trained) -> None:
    model, (train_x, _, test_x, _), _ = trained
    runs = {
        weight: ghostify.convert(
            copy.deepcopy(model),
            calibration_data=Calibration(
                train_x[:128],
                distill_steps=3,
                feature_weight=weight,
                scale_lr=True,
                memory_budget=GIB,
            ),
        )
        for weight in (0.0, 1.0)
    }
    plain, featured = runs[0.0].state_dict(), runs[1.0].state_dict()
    assert any(not torch.equal(plain[key], featured[key]) for key in plain)
    assert agreement(model, runs[1.0], test_x) > 0.9
    # The feature term's hooks are gone once the conversion returns.
    assert not any(m._forward_hooks for m in runs[1.0].modules())
    with pytest.raises(ConfigError, match="feature_weight must be a number >= 0; got -1"):
        Calibration(train_x[:8], feature_weight=-1)
