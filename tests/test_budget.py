"""convert(model, budget=...): budgets met exactly (MACs, parameters: fvcore's counts through
ghostify.report), the speed-up search's logic on a synthetic clock, unreachable budgets refused
with the model untouched, plans that rebuild the same forms, conflicting arguments refused."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torchvision
from torch import nn

import ghostify
from ghostify import Budget, ConfigError
from ghostify.budget import latency, planner, verify
from ghostify.budget.choices import choice_params
from ghostify.layers.ghost_module import GhostModule

X = torch.randn(1, 3, 32, 32)


def _models() -> dict[str, nn.Module]:
    return {
        "resnet18": torchvision.models.resnet18(),
        "mobilenet_v2": torchvision.models.mobilenet_v2(),
    }


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    ("name", "kind", "fraction"),
    [("mobilenet_v2", "macs", 0.5), ("resnet18", "params", 0.6)],
)
def test_mac_and_parameter_budgets_are_met_exactly(name, kind, fraction) -> None:
    model = _models()[name].eval()
    budget = Budget(**{kind: fraction}, ratios=(2, 3, 4, 8), sensitivity="none")
    ghostify.convert(model, budget=budget, example_inputs=X, init="scratch")
    plan = ghostify.budget_plan(model)
    totals = ghostify.report(model, X).totals
    before, after = totals[f"{kind}_before"], totals[f"{kind}_after"]
    assert after <= math.floor(fraction * before)
    # The solver's predicted totals are fvcore's counts, MACs and parameters both.
    for counted in ("macs", "params"):
        assert plan.totals[f"{counted}_before"] == totals[f"{counted}_before"]
        assert plan.totals[f"{counted}_after"] == totals[f"{counted}_after"]
    assert ghostify.plan_of(model)["options"]["budget"]["budget"][kind] == fraction
    chosen = {
        row["name"]: (row["ratio"], row["dw_size"]) for row in ghostify.plan_of(model)["layers"]
    }
    for layer, pick in zip(plan.layers, plan.picks, strict=True):
        choice = layer.choices[pick]
        assert chosen.get(layer.name) == (None if choice.keep else (choice.ratio, choice.dw_size))


def test_the_budget_spends_where_it_loses_least() -> None:
    """With a layer made to lose nothing as a ghost (its filters in scaled pairs), a tight budget
    converts that layer at the largest ratio first."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.ReLU(),
    ).eval()
    with torch.no_grad():  # layer 4: every filter a multiple of one of 4 (ratio 8 is exact)
        base = torch.randn(4, 32, 3, 3)
        model[4].weight.copy_(base.repeat(8, 1, 1, 1) * torch.rand(32, 1, 1, 1).add(0.5))
    x = torch.randn(2, 3, 12, 12)
    budget = Budget(macs=0.6, ratios=(2, 4, 8), sensitivity="none")
    plan = ghostify.plan_budget(model, budget, x)
    assert plan.choice("4").ratio == 8
    position = [layer.name for layer in plan.layers].index("4")
    assert plan.layers[position].loss[plan.picks[position]] == pytest.approx(0.0, abs=1e-6)


def test_unreachable_budget_is_refused_with_the_model_untouched() -> None:
    model = torchvision.models.resnet18().eval()
    state, modules = _state(model), [type(m) for m in model.modules()]
    with pytest.raises(ConfigError, match=r"cannot be met.*fewest MACs reachable are 0\.\d+"):
        ghostify.convert(model, budget=Budget(macs=0.05), example_inputs=X)
    assert [type(m) for m in model.modules()] == modules
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert ghostify.record_of(model) is None


def test_a_plan_saved_after_a_budgeted_conversion_rebuilds_the_same_forms() -> None:
    model = torchvision.models.resnet18().eval()
    budget = Budget(macs=0.45, ratios=(2, 4), sensitivity="none")
    ghostify.convert(model, budget=budget, example_inputs=X)
    plan, state = ghostify.plan_of(model), model.state_dict()
    rebuilt = ghostify.convert(torchvision.models.resnet18().eval(), plan=plan)
    rebuilt.load_state_dict(state)
    forms = lambda m: {  # noqa: E731
        name: (module.ratio, module.dw_size)
        for name, module in m.named_modules()
        if isinstance(module, GhostModule)
    }
    assert forms(rebuilt) == forms(model) and len({r for r, _ in forms(model).values()}) > 1
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(X), model(X))


@pytest.mark.parametrize(
    ("arguments", "shown"),
    [
        ({"ratio": 4}, "ratio=4"),
        ({"dw_size": 1}, "dw_size=1"),
        ({"overrides": {"layer1": {"ratio": 3}}}, "overrides="),
        ({"only_faster": True}, "only_faster=True"),
    ],
)
def test_settings_beside_a_budget_are_a_conflict(arguments, shown) -> None:
    model = torchvision.models.resnet18()
    with pytest.raises(ConfigError, match=f"budget= chooses every layer.*{shown}"):
        ghostify.convert(model, budget=Budget(macs=0.5), example_inputs=X, **arguments)
    assert ghostify.record_of(model) is None


def test_a_budget_needs_example_inputs() -> None:
    with pytest.raises(ConfigError, match="needs example_inputs"):
        ghostify.convert(torchvision.models.resnet18(), budget=Budget(params=0.5))


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({}, "exactly one of speedup=, macs= or params="),
        ({"speedup": 1.5, "macs": 0.5}, "exactly one of"),
        ({"speedup": 1.0}, "must be > 1"),
        ({"macs": 0}, r"in \(0, 1\]"),
        ({"params": 1.2}, r"in \(0, 1\]"),
        ({"macs": "half"}, "must be a number"),
        ({"speedup": 1.5, "runtime": "tensorrt"}, "runtime= must be one of"),
        ({"macs": 0.5, "ratios": (1, 2)}, "ratios= entry must be an int >= 2"),
        ({"macs": 0.5, "dw_sizes": (2,)}, "dw_sizes= entry must be an odd int"),
        ({"macs": 0.5, "sensitivity": "hessian"}, "sensitivity= must be one of"),
        ({"speedup": 1.2, "batch_size": 0}, "batch_size= must be a positive int"),
    ],
)
def test_bad_budgets_are_config_errors(arguments, message) -> None:
    with pytest.raises(ConfigError, match=message):
        Budget(**arguments)


# -- speed-up budgets on a synthetic clock: the search's logic, no wall-clock figure --------------


def _fake_layer_times(layers, database, **_options) -> None:
    for (
        layer
    ) in layers:  # a form's time: its parameters (no ghost overhead: the table's blind spot)
        layer.ms = [choice_params(layer.module, c) / 1000 for c in layer.choices]


def _fake_model_ms(model: nn.Module) -> float:
    """A converted model's time: its convolutions' parameters, 300 per GhostModule (what the
    layer table does not see), 5 for the rest."""
    total, inside = 5.0, set()
    for name, module in model.named_modules():
        if isinstance(module, GhostModule):
            total += sum(p.numel() for p in module.parameters()) / 1000 + 300
            inside.update(f"{name}.{child}" for child, _ in module.named_modules())
        elif isinstance(module, nn.Conv2d) and name not in inside:
            total += sum(p.numel() for p in module.parameters()) / 1000
    return total


@pytest.fixture
def synthetic_clock(monkeypatch):
    monkeypatch.setattr(planner, "time_choices", _fake_layer_times)
    monkeypatch.setattr(planner, "deployed", lambda model, args: copy.deepcopy(model).eval())
    monkeypatch.setattr(planner, "kept_orders", lambda model, select, args: frozenset())
    clock = lambda models, args, runtime: [_fake_model_ms(m) for m in models]  # noqa: E731
    monkeypatch.setattr(verify, "time_models", clock)
    monkeypatch.setattr(planner, "time_models", clock)
    monkeypatch.setattr(verify, "deployed", lambda model, args: copy.deepcopy(model).eval())
    monkeypatch.setattr(
        verify,
        "build_plan",
        lambda model, select, args, layers, picks: _built(model, layers, picks),
    )
    assert latency  # the real module stays imported; only the clock is replaced


def _built(model: nn.Module, layers, picks) -> nn.Module:
    candidate = copy.deepcopy(model)
    for layer, pick in zip(layers, picks, strict=True):
        choice = layer.choices[pick]
        if not choice.keep:
            parent, _, child = layer.name.rpartition(".")
            owner = candidate.get_submodule(parent) if parent else candidate
            conv = candidate.get_submodule(layer.name)
            setattr(owner, child, GhostModule.like(conv, choice.ratio, choice.dw_size))
    return candidate


def _small_resnet() -> nn.Module:
    """torchvision's ResNet with one BasicBlock per stage: 11 convolutions to choose for."""
    return torchvision.models.resnet.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1])


def test_speedup_plans_are_measured_and_tightened_until_they_meet_the_target(
    synthetic_clock, tmp_path
) -> None:
    target = 1.6
    budget = Budget(speedup=target, sensitivity="none", timing_cache=tmp_path)
    model, again = _small_resnet().eval(), _small_resnet().eval()
    again.load_state_dict(model.state_dict())
    ghostify.convert(model, budget=budget, example_inputs=X, init="scratch")
    plan = ghostify.budget_plan(model)
    *search, final = plan.measurements
    assert search[0].what == "fastest plan" and final.what == "converted model"
    assert final.speedup >= target and final.speedup == pytest.approx(
        max(m.speedup for m in search if m.layer_ms == final.layer_ms)
    )
    # The blind spot made the first prediction miss: a round measured short, then a tighter one.
    assert any(m.speedup < target for m in search[1:])
    assert final.model_ms == pytest.approx(_fake_model_ms(model))
    # The same architecture again: every plan's measurement comes from the timing cache, only
    # the converted model is measured anew.
    ghostify.convert(again, budget=budget, example_inputs=X, init="scratch")
    second = ghostify.budget_plan(again)
    assert [m.what for m in second.measurements[:-1]] == [f"{m.what} (cached)" for m in search]
    assert second.picks == plan.picks and second.measurements[-1].what == "converted model"


def _ratio_biased_ms(model: nn.Module) -> float:
    """The synthetic clock plus 60 per GhostModule of ratio 4 or more: a cost that depends on
    the form, which the time model (rest, layer time, converted layers) cannot see."""
    extra = sum(60.0 for m in model.modules() if isinstance(m, GhostModule) and m.ratio >= 4)
    return _fake_model_ms(model) + extra


@pytest.mark.parametrize("target", [1.3, 1.7, 2.0])
def test_a_search_the_time_model_mispredicts_still_ends_on_a_measured_plan(
    synthetic_clock, monkeypatch, tmp_path, target
) -> None:
    clock = lambda models, args, runtime: [_ratio_biased_ms(m) for m in models]  # noqa: E731
    monkeypatch.setattr(verify, "time_models", clock)
    monkeypatch.setattr(planner, "time_models", clock)
    model = _small_resnet().eval()
    budget = Budget(speedup=target, sensitivity="none", timing_cache=tmp_path)
    ghostify.convert(model, budget=budget, example_inputs=X, init="scratch")
    plan = ghostify.budget_plan(model)
    *search, final = plan.measurements
    assert len(search) <= 1 + budget.verify_rounds
    assert final.speedup >= target and final.model_ms == pytest.approx(_ratio_biased_ms(model))
    # Not the fastest plan's fallback: a plan the search aimed at the target was accepted.
    assert final.layer_ms != search[0].layer_ms


def test_a_plan_is_accepted_only_on_its_slower_measurement(
    synthetic_clock, monkeypatch, tmp_path
) -> None:
    """A clock whose first reading of each plan is 12% fast (one lucky sample): the plan kept
    must meet the target at its true time."""
    seen: set[str] = set()

    def clock(models, args, runtime):
        times = [_fake_model_ms(models[0])]
        for model in models[1:]:
            form = repr([(n, m.ratio) for n, m in model.named_modules() if hasattr(m, "ratio")])
            times.append(_fake_model_ms(model) * (1.0 if form in seen else 0.88))
            seen.add(form)
        return times

    monkeypatch.setattr(verify, "time_models", clock)
    monkeypatch.setattr(planner, "time_models", clock)
    target = 1.6
    model = _small_resnet().eval()
    original_ms = _fake_model_ms(model)
    budget = Budget(speedup=target, sensitivity="none", timing_cache=tmp_path)
    ghostify.convert(model, budget=budget, example_inputs=X, init="scratch")
    assert original_ms / _fake_model_ms(model) >= target


def test_an_unreachable_speedup_is_refused_with_the_model_untouched(synthetic_clock) -> None:
    model = _small_resnet().eval()
    state = _state(model)
    with pytest.raises(ConfigError, match=r"fastest of \d plans measured ran x\d\.\d+"):
        ghostify.convert(model, budget=Budget(speedup=50, sensitivity="none"), example_inputs=X)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert ghostify.record_of(model) is None


def test_the_plan_renders_as_table_markdown_json_chart_and_in_the_report(tmp_path) -> None:
    model = torchvision.models.resnet18().eval()
    budget = Budget(params=0.5, ratios=(2, 4), sensitivity="none")
    ghostify.convert(model, budget=budget, example_inputs=X, init="scratch")
    plan = ghostify.budget_plan(model)
    text = plan.table()
    assert text.startswith("ghostify budget: at most 0.5 of the original's parameters")
    for layer, pick in zip(plan.layers, plan.picks, strict=True):
        assert any(
            line.split()[:2] == [layer.name, layer.choices[pick].label.split()[0]]
            for line in text.splitlines()
        )
    assert plan.to_markdown().count("| layer | form |") == 1
    data = json.loads(plan.to_json(tmp_path / "plan.json"))
    assert [row["chosen"] for row in data["layers"]] == [
        layer.choices[pick].label for layer, pick in zip(plan.layers, plan.picks, strict=True)
    ]
    assert data["chosen_point"] == [pytest.approx(x) for x in plan.chosen_point]
    assert data["chosen_point"][0] <= 0.5 and len(data["frontier"]) > 2
    assert plan.to_chart(tmp_path / "tradeoff.png").stat().st_size > 1000
    report = ghostify.report(model, X)
    fraction = plan.totals["params_after"] / plan.totals["params_before"]
    assert f"budget: at most 0.5 of the original's parameters: kept {fraction:.4f}" in str(report)
    assert "**Budget:** at most 0.5" in report.to_markdown()
