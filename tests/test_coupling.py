"""Coupled channel groups found in the kept fx graph (ghostify.surgery.coupling)."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

from ghostify.surgery.coupling import Coupling, Use, find_groups
from ghostify.surgery.discovery import discover


def groups_of(model: nn.Module, converted: list[str] | None = None) -> Coupling:
    found = discover(model)
    names = [site.name for site in found.sites] if converted is None else converted
    return find_groups(model, found.graphs, names)


def on_meta(build, *args, **kwargs) -> nn.Module:
    """The model's structure alone (no weights initialised): all the coupling reads."""
    with torch.device("meta"):
        return build(*args, **kwargs)


def bottleneck_streams(model: nn.Module) -> list[set[str]]:
    """Each ResNet stage's residual stream, from the module tree: every block's last conv and
    the stage's downsample conv write into it."""
    streams = []
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        prefix = next(name for name, module in model.named_children() if module is stage)
        last = "conv3" if hasattr(stage[0], "conv3") else "conv2"
        writers = {f"{prefix}.{i}.{last}" for i in range(len(stage))}
        if stage[0].downsample is not None:
            writers.add(f"{prefix}.0.downsample.0")
        streams.append(writers)
    return streams


@pytest.mark.parametrize("arch", ["resnet50", "resnext50_32x4d"])
def test_each_resnet_stage_is_one_free_group_read_by_the_next(arch: str) -> None:
    model = on_meta(getattr(torchvision.models, arch))
    coupling = groups_of(model)
    shared = [set(group.writers) for group in coupling.groups if len(group.writers) > 1]
    assert shared == bottleneck_streams(model)
    last = coupling.group_of("layer4.2.conv3")
    assert last.free and last.channels == 2048
    assert Use("fc", 0) in last.readers  # through the global pool and flatten
    assert Use("layer4.1.bn3", 0) in last.through
    assert coupling.group_of("fc").pins == ["the channels leave the traced graph (its output)"]
    stream = coupling.group_of("layer2.1.conv3")
    assert {use.module for use in stream.readers} == {
        "layer2.1.conv1",
        "layer2.2.conv1",
        "layer2.3.conv1",
        "layer3.0.conv1",
        "layer3.0.downsample.0",
    }


def test_a_grouped_convolution_pins_what_it_reads() -> None:
    coupling = groups_of(on_meta(torchvision.models.resnext50_32x4d))
    inner = coupling.group_of("layer1.0.conv1")  # read by the 32-group conv2
    assert not inner.free and "grouped convolution (groups=32)" in inner.pins[0]
    assert coupling.group_of("layer1.0.conv2").free  # a 1x1 conv3 reads it


def test_squeeze_excitation_gates_couple_with_the_features_they_scale() -> None:
    model = torchvision.models.regnet_y_400mf()  # its widths are computed: no meta device
    coupling = groups_of(model)
    block = "trunk_output.block2.block2-1.f"
    gate = coupling.group_of(f"{block}.se.fc2")
    assert set(gate.writers) == {f"{block}.b.0", f"{block}.se.fc2"}
    assert gate.pooled == [f"{block}.se.fc2"]  # a value per sample and channel
    assert {use.module for use in gate.readers} == {f"{block}.se.fc1", f"{block}.c.0"}
    stream = coupling.group_of("trunk_output.block2.block2-0.proj.0")
    assert stream.free and len(stream.writers) == 4 and not stream.pooled


def test_a_concatenation_does_not_couple_its_inputs() -> None:
    coupling = groups_of(on_meta(torchvision.models.densenet121))
    assert all(len(group.writers) == 1 for group in coupling.groups)
    block = "features.denseblock1"
    # Layer 3 reads the block input (64 channels) and layers 1 and 2's 32 new channels each.
    first, second = (coupling.group_of(f"{block}.denselayer{i}.conv2") for i in (1, 2))
    assert Use(f"{block}.denselayer3.conv1", 64) in first.readers
    assert Use(f"{block}.denselayer3.norm1", 64) in first.through
    assert Use(f"{block}.denselayer3.conv1", 96) in second.readers
    assert Use("features.transition1.conv", 96) in second.readers
    assert first.free and second.free
    stem = coupling.group_of("features.conv0")
    assert Use(f"{block}.denselayer6.norm1", 0) in stem.through
    # The last block's new channels reach the classifier at their offset, through norm5.
    last = coupling.group_of("features.denseblock4.denselayer16.conv2")
    assert Use("classifier", 1024 - 32) in last.readers
    assert Use("features.norm5", 1024 - 32) in last.through


def test_feature_pyramid_merges_are_one_group_and_its_outputs_are_pinned() -> None:
    model = on_meta(resnet_fpn_backbone, backbone_name="resnet18", weights=None)
    coupling = groups_of(model)
    inner = coupling.group_of("fpn.inner_blocks.0.0")
    assert set(inner.writers) == {f"fpn.inner_blocks.{i}.0" for i in range(4)}
    assert inner.free and inner.channels == 256
    assert {use.module for use in inner.readers} == {f"fpn.layer_blocks.{i}.0" for i in range(4)}
    assert not coupling.group_of("fpn.layer_blocks.0.0").free  # the model's outputs
    # The frozen BatchNorms of the backbone act per channel: its streams stay free.
    stream = coupling.group_of("body.layer2.1.conv2")
    assert stream.free and Use("fpn.inner_blocks.1.0", 0) in stream.readers
    assert Use("body.layer2.1.bn2", 0) in stream.through


class PooledHead(nn.Module):
    """A residual stream read by a linear layer after a mean over the spatial axes."""

    def __init__(self, reshape: str) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)
        self.reshape = reshape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.bn(self.a(x))
        if self.reshape == "mean":
            x = x.mean((2, 3))
        elif self.reshape == "view":
            x = nn.functional.adaptive_avg_pool2d(x, 1).view(x.size(0), -1)
        else:  # a reshape that moves channels: the stream must keep its order
            x = x.permute(0, 2, 3, 1).mean((1, 2))
        return self.head(x)


@pytest.mark.parametrize("reshape", ["mean", "view"])
def test_a_stream_read_by_a_linear_layer(reshape: str) -> None:
    coupling = groups_of(PooledHead(reshape))
    stream = coupling.group_of("a")
    assert set(stream.writers) == {"stem", "a"} and stream.free
    assert stream.readers == [Use("a", 0), Use("head", 0)]
    assert stream.through == [Use("bn", 0)]


def test_a_reshape_that_moves_channels_pins_the_stream() -> None:
    stream = groups_of(PooledHead("permute")).group_of("a")
    assert not stream.free and "permute" in stream.pins[0]


def test_plain_writers_that_cannot_reorder_their_rows_pin_the_group() -> None:
    model = PooledHead("mean")
    assert groups_of(model, converted=["a"]).group_of("a").free  # the stem's rows move
    model.stem = nn.Conv2d(4, 8, 3, padding=1, groups=4)  # a grouped one's cannot
    pins = groups_of(model, converted=["a"]).group_of("a").pins
    assert pins == ["written by 'stem', whose output rows cannot be reordered"]


class SharedNorm(nn.Module):
    """One BatchNorm applied to two branches: both branches must share one order."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 6, 1)
        self.b = nn.Conv2d(3, 6, 1)
        self.bn = nn.BatchNorm2d(6)
        self.c = nn.Conv2d(12, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.cat([self.bn(self.a(x)), self.bn(self.b(x))], dim=1))


def test_a_layer_called_twice_couples_what_it_sees() -> None:
    coupling = groups_of(SharedNorm())
    group = coupling.group_of("a")
    assert group.writers == ["a", "b"] and group.free
    assert group.through == [Use("bn", 0)]
    assert group.readers == [Use("c", 0), Use("c", 6)]
