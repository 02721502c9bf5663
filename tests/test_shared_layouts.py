"""One layout per residual stream: the shared fit, the group-wide folding, and what survives."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import ghostify
from ghostify import GhostModule
from ghostify.fit import LayerStatistics, fit, fit_group
from ghostify.fit.shared import share_on_statistics

# Ops that move channels around: none is left in a model whose streams run in one order.
_REORDERING = ("index_copy", "index_select", "gather", "scatter", "index.Tensor", "take")


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def reorderings(model: nn.Module, x: torch.Tensor) -> list[str]:
    """The aten ops of one forward pass of ``model`` that gather or scatter."""
    with torch.no_grad(), _CountOps() as counter:
        model(x)
    return [name for name in counter.names if any(op in name for op in _REORDERING)]


def writers(seed: int, out: int, specs: list[tuple[int, int, int]], groups: int = 1, bias=False):
    """Convolutions writing ``out`` channels (one stream) from inputs of their own shapes."""
    torch.manual_seed(seed)
    return [
        nn.Conv2d(cin * groups, out, k, stride=s, padding=k // 2, groups=groups, bias=bias)
        for cin, k, s in specs
    ]


def filters_of(ghost: GhostModule) -> torch.Tensor:
    """The 1x1 filter of each original channel, rebuilt from a GhostModule over 1x1 convs:
    a kept filter, or a ghost's cheap centre tap times its source's filter (the other taps
    only see zero padding of a 1x1 filter's shifted copies... here they are all zero)."""
    primary = ghost.primary_conv.weight.flatten(1)
    centre = ghost.cheap_conv.weight[:, 0].flatten(1)[:, ghost.dw_size**2 // 2]
    slots = ghost.ghost_channels
    source = ghost.slot_source
    module_order = torch.cat([primary, centre[:slots, None] * primary[source]])
    return module_order[ghost.output_position]


@settings(max_examples=12, deadline=None)
@given(
    seed=st.integers(0, 100),
    out=st.sampled_from([4, 6, 8, 12]),
    ratio=st.sampled_from([2, 3]),
    inputs=st.lists(st.sampled_from([2, 3, 5]), min_size=2, max_size=3),
)
def test_shared_writers_keep_one_order_their_own_filters_and_report_their_residual(
    seed: int, out: int, ratio: int, inputs: list[int]
) -> None:
    convs = writers(seed, out, [(cin, 1, 1) for cin in inputs])
    ghosts = [GhostModule.like(conv, ratio=ratio, empty=True) for conv in convs]
    outcome = fit_group(convs, ghosts, tolerance=float("inf"), exact=True)
    assert outcome.shared
    orders = [ghost.output_position for ghost in ghosts]
    assert all(torch.equal(order, orders[0]) for order in orders)
    # The decision's estimate lets every ghost copy its best kept filter; the fitted layout
    # balances the kept filters' slots, which for 1x1 filters can only cost more (up to the
    # float32 cosines' rounding, relative to the whole weight's energy).
    pairs = ((outcome.joint, outcome.exact_joint), (outcome.own, outcome.exact_own))
    for estimates, fitted in pairs:
        assert all(a <= b + 1e-5 for a, b in zip(estimates, fitted, strict=True))
    for conv, ghost, residual in zip(convs, ghosts, outcome.exact_joint, strict=True):
        kept = ghost.intrinsic_index
        rebuilt = filters_of(ghost).detach()
        original = conv.weight.flatten(1)
        torch.testing.assert_close(rebuilt[kept], original[kept], rtol=0, atol=0)
        measured = float((rebuilt - original).square().sum() / original.square().sum())
        assert residual == pytest.approx(measured, rel=1e-4, abs=1e-7)
    # Declined (nothing is within a negative tolerance): each layer is its own fit exactly.
    ghosts = [GhostModule.like(conv, ratio=ratio, empty=True) for conv in convs]
    declined = fit_group(convs, ghosts, tolerance=-1.0)
    assert not declined.shared and "beyond" in declined.reason
    assert declined.own == outcome.own and declined.cost == pytest.approx(outcome.cost)
    assert declined.exact_cost is None  # only the layouts kept were fitted
    for conv, ghost in zip(convs, ghosts, strict=True):
        alone = fit(conv, GhostModule.like(conv, ratio=ratio)).state_dict()
        assert ghost.state_dict().keys() == alone.keys()
        for key, value in ghost.state_dict().items():
            assert torch.equal(value, alone[key]), key


def test_writers_of_other_shapes_and_groups_share_one_layout() -> None:
    """3x3 and 1x1 writers, strides, grouped filters and biases: one order, exact kept channels."""
    convs = writers(0, 16, [(4, 3, 1), (8, 1, 2), (4, 3, 2)], groups=2, bias=True)
    ghosts = [GhostModule.like(conv, empty=True) for conv in convs]
    outcome = fit_group(convs, ghosts, tolerance=float("inf"))
    assert outcome.shared and outcome.cost > 0
    assert all(torch.equal(g.output_position, ghosts[0].output_position) for g in ghosts)
    for conv, ghost in zip(convs, ghosts, strict=True):
        x = torch.randn(2, conv.in_channels, 9, 9)
        kept = ghost.intrinsic_index
        with torch.no_grad():
            torch.testing.assert_close(ghost(x)[:, kept], conv(x)[:, kept], rtol=1e-5, atol=1e-5)
        # Ghosts of one group read kept filters of the same group (they see the same inputs).
        position = ghost.output_position
        slot_group = ghost.slot_source // (ghost.intrinsic_channels // 2)
        for channel in range(16):
            if position[channel] >= ghost.intrinsic_channels:
                assert slot_group[position[channel] - ghost.intrinsic_channels] == channel // 8


def test_writers_with_other_settings_keep_their_own_layouts() -> None:
    convs = writers(0, 12, [(4, 1, 1), (4, 1, 1)])
    ghosts = [GhostModule.like(convs[0], ratio=2), GhostModule.like(convs[1], ratio=3)]
    outcome = fit_group(convs, ghosts)
    assert not outcome.shared and outcome.reason == "the writers' intrinsic_channels differ"


@pytest.fixture(scope="module")
def resnet50() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    original = torchvision.models.resnet50().eval()
    return original, ghostify.convert(copy.deepcopy(original), progress=False)


def test_deployed_resnet50_gathers_scatters_and_copies_nothing(resnet50) -> None:
    original, model = resnet50
    record = ghostify.record_of(model)
    assert {row.channel_order for row in record.layers} == {"folded"}
    streams = {row.channel_group for row in record.layers if row.layout == "shared"}
    assert len(streams) == 4  # one per stage: conv3 of every block and the downsample
    x = torch.randn(1, 3, 32, 32)
    deployed = ghostify.deploy(copy.deepcopy(model), x)
    assert reorderings(deployed, x) == []
    assert reorderings(original, x) == []
    # The counter does see a gather: the same model with one order gathered back.
    deployed.layer4[2].conv3.set_channel_order(torch.arange(2048).flip(0))
    assert reorderings(deployed, x) != []


class Stream(nn.Module):
    """A residual stream with a plain writer, an SE gate, a depthwise conv, a concatenation
    read at offsets and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.a = nn.Conv2d(16, 16, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(16)
        self.b = nn.Conv2d(16, 16, 1)
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.gate = nn.Conv2d(16, 16, 1)
        self.branch = nn.Conv2d(16, 8, 3, padding=1)
        self.bn_cat = nn.BatchNorm2d(24)
        self.mix = nn.Conv2d(24, 24, 1)
        self.head = nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.bn_a(self.a(x))
        y = self.depthwise(self.b(x))
        y = y * torch.sigmoid(self.gate(y.mean((2, 3), keepdim=True)))
        x = torch.relu(x + y)
        x = self.mix(torch.relu(self.bn_cat(torch.cat([x, self.branch(x)], dim=1))))
        return self.head(x.mean((2, 3)))


def randomised(model: nn.Module) -> nn.Module:
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.copy_(torch.randn(module.num_features, generator=generator))
                module.running_var.uniform_(0.5, 2.0, generator=generator)
    return model.eval()


def test_folding_a_whole_group_is_exact_and_undone_by_original_model() -> None:
    torch.manual_seed(0)
    original = randomised(Stream())
    x = torch.randn(2, 3, 12, 12)
    model = ghostify.convert(copy.deepcopy(original), skip_stem=False, example_inputs=x)
    unfolded = ghostify.convert(copy.deepcopy(original), skip_stem=False, fold_channel_order=False)
    record = ghostify.record_of(model)
    assert {row.channel_order for row in record.layers} <= {"folded", "gathered"}
    stream = [record.layer(name) for name in ("stem", "a", "b")]
    assert len({row.channel_group for row in stream}) == 1
    assert len({row.layout for row in stream}) == 1  # decided once for the group
    assert record.layer("gate").channel_order == "gathered"  # an SE gate: one value a channel
    gathered = [row.name for row in record.layers if row.channel_order == "gathered"]
    assert len(gathered) == (1 if stream[0].layout == "shared" else 3)
    # A gathering module writes its two halves with one index_copy_ each; nothing else moves.
    assert reorderings(model, x) == ["aten.index_copy_.default"] * 2 * len(gathered)
    with torch.no_grad():
        torch.testing.assert_close(model(x), unfolded(x), rtol=1e-5, atol=1e-5)
        assert torch.equal(ghostify.original_model(model)(x), original(x))


def test_shared_layouts_survive_a_plan_and_state_dict_round_trip() -> None:
    torch.manual_seed(0)
    model = ghostify.convert(randomised(torchvision.models.resnet18()), progress=False)
    plan = ghostify.plan_of(model)
    rows = {row["name"]: row for row in plan["layers"]}
    assert rows["layer2.1.conv2"]["layout"] == "shared"
    assert rows["layer2.1.conv2"]["channel_group"] == rows["layer2.0.downsample.0"]["channel_group"]
    fresh = ghostify.convert(torchvision.models.resnet18().eval(), plan=plan)
    fresh.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    assert ghostify.record_of(fresh).layer("layer2.1.conv2").layout == "shared"
    # A plan from before channel groups (no layout fields) still rebuilds the same model.
    for row in plan["layers"]:
        for key in ("channel_group", "layout"):
            del row[key]
    older = ghostify.convert(torchvision.models.resnet18().eval(), plan=plan)
    older.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(older(x), model(x))


def test_share_layouts_false_gathers_all_but_one_writer_per_stream() -> None:
    torch.manual_seed(0)
    model = ghostify.convert(torchvision.models.resnet18(), share_layouts=False, progress=False)
    record = ghostify.record_of(model)
    assert {row.layout for row in record.layers} == {"own"}
    gathered = [row.name for row in record.layers if row.channel_order == "gathered"]
    # Streams of 2, 3, 3 and 3 GhostModule writers: one of each runs in the stream's order.
    assert len(gathered) == 1 + 2 + 2 + 2
    with pytest.raises(ghostify.ConfigError, match="share_layouts must be True or False"):
        ghostify.convert(torchvision.models.resnet18(), share_layouts="yes")


def test_a_stream_written_by_an_earlier_conversion_keeps_its_order() -> None:
    torch.manual_seed(0)
    model = ghostify.convert(torchvision.models.resnet18().eval(), exclude=["layer1.1.conv2"])
    again = ghostify.convert(copy.deepcopy(model), include=["layer1.1.conv2"])
    unfolded = ghostify.convert(model, include=["layer1.1.conv2"], fold_channel_order=False)
    row = ghostify.record_of(again).layer("layer1.1.conv2")
    assert row.channel_order == "kept"  # the earlier GhostModule's order is not changed
    assert "written by 'layer1.0.conv2'" in row.layout_reason
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(again(x), unfolded(x))


def test_calibration_decides_each_group_again_on_the_data_and_keeps_what_it_shares() -> None:
    torch.manual_seed(0)
    original = randomised(Stream())
    data = torch.randn(64, 3, 12, 12)
    model = ghostify.convert(copy.deepcopy(original), skip_stem=False, calibration_data=data)
    record = ghostify.record_of(model)
    stream = [record.layer(name) for name in ("stem", "a", "b")]
    assert len({row.layout for row in stream}) == 1
    assert stream[0].layout_reason.startswith("on the calibration data, one layout costs x")
    if stream[0].layout == "shared":  # kept through the calibration: still one order
        assert {row.channel_order for row in stream} == {"folded"}
    unfolded = ghostify.convert(
        copy.deepcopy(original), skip_stem=False, calibration_data=data, fold_channel_order=False
    )
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(model(x), unfolded(x), rtol=1e-5, atol=1e-5)


def test_a_layout_shared_on_activations_keeps_the_kept_filters_exact() -> None:
    convs = writers(0, 12, [(4, 3, 1), (6, 1, 1)], bias=True)
    inputs = [torch.randn(16, conv.in_channels, 8, 8) for conv in convs]
    stats = []
    for conv, x in zip(convs, inputs, strict=True):
        sums = LayerStatistics(conv, dw_size=3)
        with torch.no_grad():
            sums.update(x, conv(x))
        stats.append(sums)
    ghosts = [fit(conv, GhostModule.like(conv)) for conv in convs]
    before = [copy.deepcopy(ghost.state_dict()) for ghost in ghosts]
    declined = share_on_statistics(convs, ghosts, stats, [None, None], tolerance=-1.0)
    assert not declined.shared and "beyond" in declined.reason
    for ghost, state in zip(ghosts, before, strict=True):  # left as they were
        assert all(torch.equal(value, state[key]) for key, value in ghost.state_dict().items())
    kept = share_on_statistics(convs, ghosts, stats, [None, None], tolerance=float("inf"))
    assert kept.shared and kept.cost > 0 and "within" in kept.reason
    assert torch.equal(ghosts[0].output_position, ghosts[1].output_position)
    for conv, ghost, x in zip(convs, ghosts, inputs, strict=True):
        index = ghost.intrinsic_index
        with torch.no_grad():
            torch.testing.assert_close(ghost(x)[:, index], conv(x)[:, index])
