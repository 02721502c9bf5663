"""Plans cannot be misapplied: a rebuild fits nothing, and a plan for another model is an error."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision

import ghostify
from ghostify import ConfigError, PlanError


@pytest.fixture(scope="module")
def resnet18_plan() -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(0)
    model = ghostify.convert(torchvision.models.resnet18(num_classes=10), progress=False)
    return model, ghostify.plan_of(model)


def test_rebuilding_from_a_plan_does_not_fit(resnet18_plan, monkeypatch) -> None:
    model, plan = resnet18_plan

    def no_fit(*_args, **_kwargs):
        raise AssertionError("the plan path fitted a layer")

    monkeypatch.setattr("ghostify.surgery.build.fit_as_built", no_fit)
    fresh = ghostify.convert(torchvision.models.resnet18(num_classes=10), plan=plan)
    fresh.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), model.eval()(x))


def test_init_weights_with_a_plan_fits_like_a_fresh_conversion(monkeypatch) -> None:
    original = torchvision.models.resnet18(num_classes=10)
    twin = copy.deepcopy(original)
    converted = ghostify.convert(original)
    plan = ghostify.plan_of(converted)
    fitted = []
    real_fit = ghostify.surgery.build.fit_as_built
    monkeypatch.setattr(
        "ghostify.surgery.build.fit_as_built",
        lambda originals, *a: fitted.extend(originals) or real_fit(originals, *a),
    )
    rebuilt = ghostify.convert(twin, plan=plan, init="weights")
    assert len(fitted) == len(plan["layers"])
    assert ghostify.plan_of(rebuilt)["layers"] == plan["layers"]  # folded the same way
    for (name, a), b in zip(
        converted.state_dict().items(), rebuilt.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


def test_a_plan_for_a_smaller_model_names_the_convolutions_it_misses(resnet18_plan) -> None:
    _, plan = resnet18_plan
    with pytest.raises(PlanError, match="convolution.* the plan does not mention") as error:
        ghostify.convert(torchvision.models.resnet34(num_classes=10), plan=plan)
    assert "layer1.2.conv1" in str(error.value)  # resnet34 has a third block in layer1


def test_a_plan_naming_layers_the_model_lacks() -> None:
    bigger = ghostify.plan_of(
        ghostify.convert(torchvision.models.resnet34(num_classes=10), init="scratch")
    )
    model = torchvision.models.resnet18(num_classes=10)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(PlanError, match=r"layer1\.2"):
        ghostify.convert(model, plan=bigger)
    after = model.state_dict()
    assert all(torch.equal(before[key], after[key]) for key in before)  # left untouched
    assert not any(isinstance(m, ghostify.GhostModule) for m in model.modules())


@pytest.mark.parametrize(
    ("argument", "shown"),
    [({"ratio": 4}, "ratio=4"), ({"exclude": ["fc"]}, "exclude=['fc']"), ({"dw_size": 5}, "5")],
)
def test_settings_beside_a_plan_are_a_conflict(resnet18_plan, argument, shown) -> None:
    _, plan = resnet18_plan
    with pytest.raises(ConfigError, match="cannot be combined") as error:
        ghostify.convert(torchvision.models.resnet18(num_classes=10), plan=plan, **argument)
    assert shown in str(error.value)


def test_bad_example_inputs_with_a_plan_are_a_config_error(resnet18_plan) -> None:
    _, plan = resnet18_plan
    with pytest.raises(ConfigError, match="rejected example_inputs"):
        ghostify.convert(
            torchvision.models.resnet18(num_classes=10),
            plan=plan,
            example_inputs=torch.randn(1, 5, 32, 32),
        )


class GroupedNet(torch.nn.Module):
    """Two grouped convs of eight channels per group: at ratio 3 each group keeps 4 filters (the
    earlier rule kept 3, and its surplus slots crossed groups); at ratio 2 both rules keep 4."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 32, 3, padding=1)
        self.grouped = torch.nn.Conv2d(32, 32, 3, padding=1, groups=4)
        self.head = torch.nn.Conv2d(32, 32, 3, padding=1, groups=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.grouped(self.stem(x)))


@pytest.mark.parametrize("ratio", [2, 3])
def test_a_plan_records_and_checks_each_layers_kept_filter_count(ratio: int) -> None:
    converted = ghostify.convert(GroupedNet(), ratio=ratio, progress=False)
    plan = ghostify.plan_of(converted)
    counts = {row["name"]: row["intrinsic_channels"] for row in plan["layers"]}
    assert counts == {"grouped": 16, "head": 16}  # 4 groups x 4 kept filters
    rebuilt = ghostify.convert(GroupedNet(), plan=plan, progress=False)
    rebuilt.load_state_dict(converted.state_dict())
    tampered = copy.deepcopy(plan)
    tampered["layers"][1]["intrinsic_channels"] = 12
    with pytest.raises(PlanError, match="'head' records 12 intrinsic channels.*gives 16"):
        ghostify.convert(GroupedNet(), plan=tampered, progress=False)
    # A plan from before the count was recorded: rebuilt where the earlier layout was the same
    # (ratio 2), refused by name where it made ghosts from other groups' inputs (ratio 3).
    legacy = copy.deepcopy(plan)
    for row in legacy["layers"]:
        del row["intrinsic_channels"]
    if ratio == 2:
        ghostify.convert(GroupedNet(), plan=legacy, progress=False)
    else:
        with pytest.raises(PlanError, match="'grouped' was made by an earlier ghostify"):
            ghostify.convert(GroupedNet(), plan=legacy, progress=False)
