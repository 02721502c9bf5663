"""convert / plan_of on real torchvision models and on the awkward cases real code contains."""

from __future__ import annotations

import copy
import importlib
import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrize
from torchvision.models import mobilenet_v3_small, resnet18, resnet50

import ghostify
from ghostify import ConfigError, ConversionError, GhostModule, PlanError
from ghostify.surgery.swap import Transaction, _dealt


def convs(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if type(m) is nn.Conv2d}


def snapshot(model: nn.Module) -> tuple[dict[str, nn.Module], dict[str, torch.Tensor]]:
    modules = dict(model.named_modules())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return modules, state


def assert_unchanged(model: nn.Module, before: tuple) -> None:
    modules, state = before
    assert dict(model.named_modules()) == modules
    after = model.state_dict()
    assert after.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(after[key], value), key


@pytest.fixture(scope="module")
def resnet50_pair(fvcore_macs) -> tuple[nn.Module, nn.Module, int]:
    original = resnet50()
    x = torch.randn(1, 3, 224, 224)
    before = fvcore_macs(original, x)
    converted = ghostify.convert(copy.deepcopy(original))
    return original, converted, before


def test_resnet50_keeps_class_and_stem_and_halves_macs(resnet50_pair, fvcore_macs) -> None:
    original, converted, before = resnet50_pair
    assert type(converted) is type(original)
    assert type(converted.conv1) is nn.Conv2d  # the stem stays, as the GhostNet authors did
    assert torch.equal(converted.conv1.weight, original.conv1.weight)
    assert callable(converted._forward_impl)  # methods intact
    after = fvcore_macs(converted, torch.randn(1, 3, 224, 224))
    assert before / after >= 1.85, (before, after)
    ghosts = [m for m in converted.modules() if isinstance(m, GhostModule)]
    # every conv but the stem: 1 stem + 16 blocks * 3 + 4 downsample convs = 53 convs
    assert len(ghosts) == 52


def test_every_conv_is_accounted_for(resnet50_pair) -> None:
    original, converted, _ = resnet50_pair
    plan = ghostify.plan_of(converted)
    names = {row["name"] for row in plan["layers"]} | {row["name"] for row in plan["skipped"]}
    assert names == set(convs(original))
    assert all(row["reason"] for row in plan["skipped"])
    assert all(row["found_by"] == "fx" for row in plan["layers"])


def test_plan_round_trip_loads_state_and_matches_outputs(resnet50_pair) -> None:
    _, converted, _ = resnet50_pair
    plan = json.loads(json.dumps(ghostify.plan_of(converted)))
    fresh = ghostify.convert(resnet50(), plan=plan)
    fresh.load_state_dict(converted.state_dict(), strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), converted.eval()(x))
    rebuilt = ghostify.plan_of(fresh)["layers"]
    assert [(r["name"], r["conv"], r["ratio"], r["dw_size"]) for r in rebuilt] == [
        (r["name"], r["conv"], r["ratio"], r["dw_size"]) for r in plan["layers"]
    ]


def test_plan_that_does_not_fit_is_refused_and_model_untouched(resnet50_pair) -> None:
    _, converted, _ = resnet50_pair
    target = resnet18()
    before = snapshot(target)
    with pytest.raises(PlanError, match="does not fit|matches no module"):
        ghostify.convert(target, plan=ghostify.plan_of(converted))
    assert_unchanged(target, before)
    with pytest.raises(PlanError, match="plan must be the dict"):
        ghostify.convert(resnet18(), plan=[1, 2])


def test_options_with_example_inputs_and_verification() -> None:
    model = resnet18()
    x = torch.randn(1, 3, 64, 64)
    ghostify.convert(model, ratio=4, dw_size=5, exclude=["fc", "layer4.*"], example_inputs=x)
    plan = ghostify.plan_of(model)
    assert all(not row["name"].startswith("layer4") for row in plan["layers"])
    assert all(row["ratio"] == 4 and row["dw_size"] == 5 for row in plan["layers"])
    reasons = {row["name"]: row["reason"] for row in plan["skipped"]}
    assert reasons["layer4.0.conv1"] == "excluded by pattern 'layer4.*'"
    assert "stem" in reasons["conv1"]
    assert model(x).shape == (1, 1000)


def test_overrides_precedence_glob_then_exact_name() -> None:
    model = resnet18()
    ghostify.convert(
        model,
        ratio=2,
        overrides={
            "layer2": {"ratio": 3},
            "layer2.*": {"ratio": 4, "dw_size": 5},
            "layer2.0.conv1": {"ratio": 8},
        },
    )
    rows = {row["name"]: row for row in ghostify.plan_of(model)["layers"]}
    assert rows["layer1.0.conv1"]["ratio"] == 2
    assert (rows["layer2.1.conv1"]["ratio"], rows["layer2.1.conv1"]["dw_size"]) == (4, 5)
    assert (rows["layer2.0.conv1"]["ratio"], rows["layer2.0.conv1"]["dw_size"]) == (8, 5)


def test_auto_dw_size_gives_pointwise_convs_a_1x1_cheap_op_and_replans_exactly() -> None:
    model = resnet18()  # 3x3 convs and 1x1 downsampling convs
    ghostify.convert(model, dw_size="auto", overrides={"layer4.*": {"dw_size": 5}})
    rows = {row["name"]: row for row in ghostify.plan_of(model)["layers"]}
    for name, row in rows.items():
        kernel = model.get_submodule(name).kernel_size
        want = 5 if name.startswith("layer4.") else 1 if kernel == (1, 1) else 3
        assert row["dw_size"] == want, name
    assert {row["dw_size"] for row in rows.values()} == {1, 3, 5}
    # The plan holds the resolved sizes: a fresh model rebuilt from it has the same layers.
    rebuilt = ghostify.convert(resnet18(), plan=ghostify.plan_of(model))
    rebuilt.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(rebuilt.eval()(x), model.eval()(x))


def test_include_and_skip_stem() -> None:
    model = resnet18()
    ghostify.convert(model, include=["conv1", "layer1"], skip_stem=False)
    converted = {row["name"] for row in ghostify.plan_of(model)["layers"]}
    assert converted == {"conv1"} | {f"layer1.{b}.conv{c}" for b in (0, 1) for c in (1, 2)}


def test_depthwise_and_unprofitable_convs_are_skipped_with_reasons() -> None:
    original = mobilenet_v3_small()
    model = ghostify.convert(copy.deepcopy(original))
    plan = ghostify.plan_of(model)
    reasons = [row["reason"] for row in plan["skipped"]]
    assert any(r.startswith("depthwise convolution") for r in reasons)
    assert len(plan["layers"]) > 10
    for name, module in original.named_modules():
        if type(module) is nn.Conv2d and module.groups == module.in_channels > 1:
            assert name in {row["name"] for row in plan["skipped"]}


class Branchy(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace this forward."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.a = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU())
        self.b = nn.Conv2d(16, 32, 3, padding=1)
        self.head = nn.Conv2d(32, 32, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.a(x) if x.mean() > 0 else self.b(x)
        return self.head(x)


def test_model_that_does_not_trace_still_converts() -> None:
    model = ghostify.convert(Branchy())
    plan = ghostify.plan_of(model)
    found = {row["name"]: row["found_by"] for row in plan["layers"] + plan["skipped"]}
    assert found["a.0"] == "fx-submodule"
    assert isinstance(model.head, GhostModule) and isinstance(model.a[0], GhostModule)
    assert model(torch.randn(1, 3, 8, 8)).shape == (1, 32, 8, 8)


def test_model_that_does_not_trace_uses_hooks_with_example_inputs() -> None:
    model = Branchy()
    with torch.no_grad():
        model.stem.bias.fill_(10.0)  # makes the forward take branch a
    ghostify.convert(model, example_inputs=torch.randn(1, 3, 8, 8))
    plan = ghostify.plan_of(model)
    found = {row["name"]: row["found_by"] for row in plan["layers"] + plan["skipped"]}
    assert found["stem"] == "hooks" and found["a.0"] == "hooks"
    assert found["b"] == "module-walk"  # never ran, still converted
    assert isinstance(model.b, GhostModule)
    assert "stem" in {row["name"] for row in plan["skipped"]}


class CachesOnFirstCall(nn.Module):
    """Keeps something about its input on the first call, as torchvision's MultiScaleRoIAlign
    keeps its feature-map scales."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.body = nn.Conv2d(16, 32, 3, padding=1)
        self.width: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.width is None:
            self.width = x.shape[-1]  # a Proxy while fx traces
        return self.body(self.stem(x)) / self.width


def test_tracing_leaves_no_proxies_behind_in_a_model_never_run() -> None:
    model = ghostify.convert(CachesOnFirstCall())
    assert isinstance(model.body, GhostModule)
    assert model.width is None  # as before the conversion: the trace's value is not kept
    assert model(torch.randn(1, 3, 8, 8)).shape == (1, 32, 8, 8)
    assert model.width == 8


def test_failure_part_way_leaves_model_exactly_as_it_was(monkeypatch) -> None:
    model = resnet18()
    before = snapshot(model)
    fit_package = importlib.import_module("ghostify.fit")  # ghostify.fit is also the function
    real = fit_package.finish_layout
    calls = []

    def flaky(draft, slot):
        calls.append(draft)
        if len(calls) == 5:  # the fifth fit to finish fails, after others were fitted
            raise RuntimeError("simulated failure")
        return real(draft, slot)

    monkeypatch.setattr(fit_package, "finish_layout", flaky)
    with pytest.raises(ConversionError, match="simulated failure"):
        ghostify.convert(model)
    assert_unchanged(model, before)
    assert ghostify.record_of(model) is None


def test_a_layer_failing_to_build_is_named_and_leaves_model_as_it_was(monkeypatch) -> None:
    model = resnet18()
    before = snapshot(model)
    real = GhostModule.like.__func__

    def failing_like(cls, conv, **kwargs):
        if conv is model.layer2[1].conv1:
            raise RuntimeError("simulated build failure")
        return real(cls, conv, **kwargs)

    monkeypatch.setattr(GhostModule, "like", classmethod(failing_like))
    with pytest.raises(ConversionError, match=r"'layer2.1.conv1'.*simulated build failure"):
        ghostify.convert(model)
    assert_unchanged(model, before)
    assert ghostify.record_of(model) is None


def test_a_failure_after_folding_restores_every_folded_tensor(monkeypatch) -> None:
    # The channel orders are folded into the BatchNorms after each conv (several tensors at a
    # time); the check after them fails, and every permuted tensor must be as it was.
    model = resnet18()
    for module in model.modules():  # non-trivial running statistics, so a permutation shows
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
    before = snapshot(model)
    convert_module = importlib.import_module("ghostify.surgery.convert")
    folded = []
    real_fold = convert_module.fold_channel_orders

    def fold_then_fail(*args):
        folded.append(real_fold(*args))
        raise RuntimeError("simulated failure after folding")

    monkeypatch.setattr(convert_module, "fold_channel_orders", fold_then_fail)
    with pytest.raises(RuntimeError, match="after folding"):
        ghostify.convert(model)
    permuted = {(p.module, p.tensor) for order in folded[0].values() for p in order.permutations}
    assert len(permuted) > 20  # BN tensors were permuted
    assert_unchanged(model, before)


def test_a_failed_permutation_leaves_the_ones_done_undoable() -> None:
    model = nn.Sequential(nn.BatchNorm2d(4), nn.BatchNorm2d(4))
    for module in model:
        module.running_mean.normal_()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    index = torch.tensor([3, 2, 1, 0])
    too_short = torch.zeros(2)
    changes = Transaction(model)
    edits = [(model[0].running_mean, 0, index), (too_short, 0, index)]
    edits.append((model[1].running_mean, 0, index))
    with pytest.raises((IndexError, RuntimeError)):
        changes.permute_all(edits)
    assert not torch.equal(model[1].running_mean, before["1.running_mean"])  # applied
    changes.rollback()
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


@given(sizes=st.lists(st.integers(1, 1000), max_size=30), parts=st.integers(2, 4))
def test_edits_are_dealt_to_the_cores_once_each_and_balanced(sizes, parts) -> None:
    index = torch.arange(1)
    edits = [(torch.empty(size), 0, index) for size in sizes]
    shares = _dealt(edits, parts)
    assert len(shares) == parts
    assert sorted(i for share in shares for i in share) == list(range(len(sizes)))
    loads = [sum(sizes[i] for i in share) for share in shares]
    # Largest first to the least loaded: no share exceeds another by more than one edit.
    assert max(loads) - min(loads) <= max(sizes, default=0)


class ReadsWeight(nn.Module):
    """Uses a conv's weight directly, which only fails after the swap (no fx: data-dependent)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3)
        self.conv = nn.Conv2d(16, 16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if x.sum() > -1e9:
            x = torch.nn.functional.conv2d(x, self.conv.weight)
        return x


def test_failing_check_forward_rolls_back_every_layer() -> None:
    model = ReadsWeight()
    before = snapshot(model)
    with pytest.raises(ConversionError, match="unchanged"):
        ghostify.convert(model, example_inputs=torch.randn(1, 3, 12, 12))
    assert_unchanged(model, before)


class DirectWeightTraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3)
        self.conv = nn.Conv2d(16, 16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(self.stem(x), self.conv.weight)


def test_weight_read_directly_is_skipped_when_fx_sees_it() -> None:
    model = ghostify.convert(DirectWeightTraceable())
    reasons = {r["name"]: r["reason"] for r in ghostify.plan_of(model)["skipped"]}
    assert "reads this layer's weight" in reasons["conv"]
    assert model(torch.randn(1, 3, 10, 10)).shape == (1, 16, 6, 6)


def test_converting_twice_does_not_ghost_the_ghosts() -> None:
    model = ghostify.convert(resnet18())
    first = [m for m in model.modules() if isinstance(m, GhostModule)]
    ghostify.convert(model)
    second = [m for m in model.modules() if isinstance(m, GhostModule)]
    assert first == second
    assert all(type(m.primary_conv) is nn.Conv2d for m in second)
    reasons = [r["reason"] for r in ghostify.plan_of(model)["skipped"]]
    assert reasons.count("already a GhostModule") == len(first)


class Containers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        shared = nn.Conv2d(16, 16, 3, padding=1)
        self.blocks = nn.ModuleList([shared, nn.Conv2d(16, 16, 3, padding=1)])
        self.heads = nn.ModuleDict({"main": nn.Conv2d(16, 8, 1), "again": shared})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.heads["main"](self.heads["again"](x))


def test_shared_conv_and_containers_are_replaced_everywhere() -> None:
    model = ghostify.convert(Containers())
    assert isinstance(model.blocks[0], GhostModule)
    assert model.blocks[0] is model.heads["again"]  # still shared after the swap
    assert isinstance(model.blocks[1], GhostModule) and isinstance(model.heads["main"], GhostModule)
    row = next(r for r in ghostify.plan_of(model)["layers"] if r["name"] == "blocks.0")
    assert row["found_by"] == "fx"
    assert model(torch.randn(1, 3, 8, 8)).shape == (1, 8, 8, 8)


class MyConv(nn.Conv2d):
    """A subclass with its own forward (one that only sets arguments converts as torch's conv)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)


class WithSubclassAndScript(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.custom = MyConv(16, 16, 3, padding=1)
        self.scripted = torch.jit.script(nn.Sequential(nn.Conv2d(16, 16, 3, padding=1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scripted(self.custom(self.stem(x)))


def test_subclasses_need_opt_in_and_scripted_convs_are_reported() -> None:
    model = ghostify.convert(WithSubclassAndScript())
    reasons = {r["name"]: r["reason"] for r in ghostify.plan_of(model)["skipped"]}
    assert "allow_subclasses=[MyConv]" in reasons["custom"]
    assert "TorchScript" in reasons["scripted.0"]
    ghostify.convert(model, allow_subclasses=[MyConv])
    assert isinstance(model.custom, GhostModule)


def test_hooks_and_parametrizations_warn() -> None:
    model = Containers()
    model.blocks[1].register_forward_hook(lambda *a: None)

    class Double(nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return 2 * w

    parametrize.register_parametrization(model.heads["main"], "weight", Double())
    x = torch.randn(1, 3, 8, 8)
    with pytest.warns(UserWarning) as record:
        ghostify.convert(model)
    messages = " ".join(str(w.message) for w in record)
    assert "'blocks.1' had hooks" in messages and "parametrizations (weight)" in messages
    assert isinstance(model.heads["main"], GhostModule)
    assert model(x).shape == (1, 8, 8, 8)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ratio": 1}, "ratio must be an int >= 2"),
        ({"ratio": 2.5}, "ratio must be an int >= 2"),
        ({"dw_size": 4}, "dw_size must be an odd int >= 1 or 'auto'"),
        ({"overrides": {"layer1": {"dw_size": "big"}}}, r"overrides\['layer1'\]\['dw_size'\]"),
        ({"init": "xavier"}, "init must be one of"),
        ({"exclude": ["layer9.*"]}, "exclude pattern 'layer9.*' matches no module"),
        ({"include": ["layr1"]}, "close names: layer1"),
        ({"include": [3]}, "include must be a list of name patterns"),
        ({"overrides": {"layer1": {"ratoi": 3}}}, "keys among"),
        ({"overrides": {"layer1": {"ratio": 1}}}, r"overrides\['layer1'\]\['ratio'\]"),
        ({"allow_subclasses": "yes"}, "allow_subclasses must be"),
        ({"example_inputs": [torch.randn(1, 3, 8, 8)]}, "example_inputs must be a tensor"),
        (
            {"example_inputs": torch.randn(1, 5, 8, 8)},
            r"rejected example_inputs \(1x5x8x8\)",
        ),
    ],
)
def test_bad_arguments_are_named_and_model_untouched(kwargs: dict, message: str) -> None:
    model = resnet18()
    before = snapshot(model)
    with pytest.raises(ConfigError, match=message):
        ghostify.convert(model, **kwargs)
    assert_unchanged(model, before)


def test_not_a_module_and_lazy_conv() -> None:
    with pytest.raises(ConfigError, match="model must be a torch.nn.Module; got str"):
        ghostify.convert("resnet50")
    lazy = nn.Sequential(nn.Conv2d(3, 8, 3), nn.LazyConv2d(16, 3))
    with pytest.raises(ConfigError, match="forward pass"):
        ghostify.convert(lazy)
    lazy(torch.randn(1, 3, 8, 8))  # materialises the lazy conv; now it converts
    ghostify.convert(lazy)
    assert isinstance(lazy[1], GhostModule)


def test_tensor_and_one_tuple_inputs_mean_the_same() -> None:
    x = torch.randn(1, 3, 32, 32)
    a = ghostify.plan_of(ghostify.convert(resnet18(), example_inputs=x))
    b = ghostify.plan_of(ghostify.convert(resnet18(), example_inputs=(x,)))
    assert a == b


def test_a_selection_object_means_the_same_as_the_keywords() -> None:
    keywords = {"exclude": ["layer4"], "overrides": {"layer1.*": {"ratio": 4}}, "skip_stem": False}
    flat = ghostify.plan_of(ghostify.convert(resnet18(), init="scratch", **keywords))
    grouped = ghostify.plan_of(
        ghostify.convert(resnet18(), init="scratch", select=ghostify.Selection(**keywords))
    )
    assert flat == grouped
    ratios = {row["name"]: row["ratio"] for row in grouped["layers"]}
    assert ratios["conv1"] == 2 and ratios["layer1.0.conv1"] == 4  # stem converted, overridden
    assert not any(name.startswith("layer4") for name in ratios)


def test_a_selection_beside_its_keywords_is_refused_before_any_change() -> None:
    model = resnet18()
    before = snapshot(model)
    with pytest.raises(ConfigError, match=r"select= already .* exclude=\['fc'\]"):
        ghostify.convert(model, select=ghostify.Selection(include=["layer1"]), exclude=["fc"])
    with pytest.raises(ConfigError, match="select must be a ghostify.Selection; got dict"):
        ghostify.convert(model, select={"include": ["layer1"]})
    with pytest.raises(ConfigError, match="include pattern 'layr1' matches no module"):
        ghostify.convert(model, select=ghostify.Selection(include=["layr1"]))
    assert_unchanged(model, before)


def test_the_conversion_pass_does_not_reach_up_into_calibration() -> None:
    """surgery is below tune: its modules import nothing from ghostify.tune (or the pipeline)."""
    import ast
    import pathlib

    folder = pathlib.Path(ghostify.__file__).parent / "surgery"
    for path in folder.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.lstrip(".").startswith(("tune", "pipeline")), path.name
