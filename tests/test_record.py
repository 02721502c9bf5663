"""The conversion record, the kept graph, channel-order folding and the swap helper."""

from __future__ import annotations

import copy
import importlib
import json

import pytest
import torch
import torchvision
from torch import nn

import ghostify
from ghostify import ConfigError, ConversionError, GhostifyError, GhostModule
from ghostify.layers.ghost_module import scatter_channels
from ghostify.surgery.discovery import discover
from ghostify.surgery.graph import Neighbour
from ghostify.surgery.record import ConvertedLayer, LayerSettings, SkippedConv
from ghostify.surgery.swap import replace_everywhere, transaction

X = torch.randn(2, 3, 32, 32)


def randomise_batchnorms(model: nn.Module) -> nn.Module:
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(torch.rand(n, generator=generator) - 0.5)
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
    return model


@pytest.fixture(scope="module")
def pair() -> tuple[nn.Module, nn.Module]:
    """An original resnet18 (eval) and its fitted conversion."""
    torch.manual_seed(0)
    original = randomise_batchnorms(torchvision.models.resnet18()).eval()
    return original, ghostify.convert(copy.deepcopy(original))


def residual_inputs(model: nn.Module) -> set[str]:
    """torchvision ResNet: the convs whose BatchNorm output meets a residual add."""
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, torchvision.models.resnet.BasicBlock):
            names.add(f"{name}.conv2")
            if module.downsample is not None:
                names.add(f"{name}.downsample.0")
    return names


def test_record_is_typed_and_plan_is_its_json_view(pair) -> None:
    _, model = pair
    record = ghostify.record_of(model)
    assert isinstance(record, ghostify.ConversionRecord)
    assert all(isinstance(row, ConvertedLayer) for row in record.layers)
    assert all(isinstance(row, SkippedConv) for row in record.skipped)
    assert [row.name for row in record.skipped] == ["conv1"]  # the stem
    assert record.layers[0].settings == LayerSettings(ratio=2, dw_size=3)
    assert {row.found_by for row in record.layers} == {"fx"}
    plan = ghostify.plan_of(model)
    assert json.loads(json.dumps(plan)) == plan
    assert [row["name"] for row in plan["layers"]] == [row.name for row in record.layers]
    assert {row["channel_order"] for row in plan["layers"]} <= {"folded", "kept"}


def test_originals_are_kept_untouched_and_give_back_the_original_model(pair) -> None:
    original, model = pair
    record = ghostify.record_of(model)
    layer = record.layers[0]
    kept = record.original_of(layer.name)
    assert type(kept) is nn.Conv2d
    assert torch.equal(kept.weight, original.get_submodule(layer.name).weight)
    teacher = ghostify.original_model(model)
    assert not any(isinstance(m, GhostModule) for m in teacher.modules())
    with torch.no_grad():
        assert torch.equal(teacher(X), original(X))  # permutations undone, bit for bit
    assert any(isinstance(m, GhostModule) for m in model.modules())  # converted one unchanged


def test_without_originals_the_record_says_so() -> None:
    model = ghostify.convert(torchvision.models.resnet18(), init="scratch", keep_originals=False)
    with pytest.raises(GhostifyError, match="keep_originals"):
        ghostify.record_of(model).original_of("layer1.0.conv1")
    with pytest.raises(GhostifyError, match="keep_originals=True"):
        ghostify.original_model(model)


def test_each_residual_stream_lives_in_one_order_with_no_gather(pair) -> None:
    original, model = pair
    record = ghostify.record_of(model)
    shared = {row.name for row in record.layers if row.layout == "shared"}
    assert shared == residual_inputs(original)
    assert {row.channel_order for row in record.layers} == {"folded"}
    # The stem (not converted) writes into layer1's stream: its output rows were permuted.
    assert any(
        p.module == "conv1" and p.dim == 0 for p in record.layer("layer1.0.conv2").folded_into
    )
    traced = torch.fx.symbolic_trace(model)
    assert not [n for n in traced.graph.nodes if n.target is scatter_channels]
    assert not [n for n in traced.graph.nodes if n.target in ("index_select", torch.index_select)]
    # Folding is exact: the same layers with every order gathered back compute the same.
    gathered = ghostify.convert(copy.deepcopy(original), fold_channel_order=False)
    kept = {row.name for row in ghostify.record_of(gathered).layers if row.channel_order == "kept"}
    assert len(kept) == 19  # every converted layer gathers back to the original order
    with torch.no_grad():
        torch.testing.assert_close(model(X), gathered(X), rtol=1e-4, atol=1e-4)


def test_folded_orders_round_trip_through_plan_and_state_dict(pair) -> None:
    _, model = pair
    fresh = ghostify.convert(torchvision.models.resnet18(), plan=ghostify.plan_of(model))
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh.eval()(X), model.eval()(X))


def test_failure_after_folding_puts_every_tensor_back(monkeypatch) -> None:
    model = randomise_batchnorms(torchvision.models.resnet18())
    before = copy.deepcopy(model.state_dict())

    def fail(_model, _args):
        raise ConversionError("simulated failure after the swap")

    # The module, not the function ghostify.surgery re-exports under the same name.
    module = importlib.import_module("ghostify.surgery.convert")
    monkeypatch.setattr(module, "_check_forward", fail)
    with pytest.raises(ConversionError, match="simulated"):
        ghostify.convert(model)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BatchNorms un-permuted too
    assert not any(isinstance(m, GhostModule) for m in model.modules())


class Branches(nn.Module):
    """A conv feeding a concat, another feeding the model's output and an add."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.left = nn.Conv2d(8, 8, 3, padding=1)
        self.right = nn.Conv2d(16, 8, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        stem = self.stem(x)
        both = torch.cat([stem, self.left(stem)], dim=1)
        right = self.right(both)
        return right, right + stem


def test_discovery_keeps_typed_producers_and_consumers() -> None:
    found = discover(Branches())
    sites = {site.name: site for site in found.sites}
    assert sites["left"].producers == [Neighbour("conv", "stem")]
    assert sites["left"].consumers == [Neighbour("cat", "cat")]
    assert {n.kind for n in sites["stem"].consumers} == {"conv", "cat", "add"}
    assert {n.kind for n in sites["right"].consumers} == {"output", "add"}
    assert len(found.graphs) == 1 and found.graphs[0].prefix == ""


def test_transaction_replaces_shared_modules_everywhere_and_rolls_back() -> None:
    shared = nn.Conv2d(4, 4, 1)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    new = nn.Identity()
    with pytest.raises(RuntimeError, match="boom"), transaction(model) as changes:
        changes.replace(shared, new)
        assert model[0] is new and model[2] is new
        raise RuntimeError("boom")
    assert model[0] is shared and model[2] is shared
    copied = replace_everywhere(model, {id(shared): new})
    assert copied is model and model[0] is new and model[2] is new


def test_plan_fixes_the_settings_so_conflicting_arguments_are_errors() -> None:
    plan = ghostify.plan_of(ghostify.convert(torchvision.models.resnet18(), init="scratch"))
    with pytest.raises(ConfigError, match=r"ratio=4 cannot be combined"):
        ghostify.convert(torchvision.models.resnet18(), plan=plan, ratio=4)
    with pytest.raises(ConfigError, match=r"exclude=\['fc'\], skip_stem=False"):
        ghostify.convert(torchvision.models.resnet18(), plan=plan, exclude=["fc"], skip_stem=False)


def test_plan_with_inputs_the_model_rejects_is_a_config_error() -> None:
    plan = ghostify.plan_of(ghostify.convert(torchvision.models.resnet18(), init="scratch"))
    model = torchvision.models.resnet18()
    with pytest.raises(ConfigError, match="rejected example_inputs.*1x1x32x32"):
        ghostify.convert(model, plan=plan, example_inputs=torch.randn(1, 1, 32, 32))
    assert not any(isinstance(m, GhostModule) for m in model.modules())
