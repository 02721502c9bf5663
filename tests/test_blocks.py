"""SELayer and GhostBottleneck, the building blocks for Ghost networks built directly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ghostify import ConfigError, GhostBottleneck, GhostModule, SELayer


def test_se_layer_scales_each_channel_by_a_clamped_gate() -> None:
    se = SELayer(8, reduction=4)
    assert se.fc[0].out_features == 2  # channels // reduction
    x = torch.rand(3, 8, 5, 5) + 0.1
    y = se(x)
    gate = y / x  # the same factor for every position of a channel
    assert torch.allclose(gate, gate[:, :, :1, :1].expand_as(gate), atol=1e-6)
    assert gate.min() >= 0 and gate.max() <= 1 + 1e-6


def test_se_layer_gate_matches_hand_computation() -> None:
    se = SELayer(4, reduction=2)
    x = torch.randn(2, 4, 3, 3)
    pooled = x.mean(dim=(2, 3))
    hidden = torch.relu(pooled @ se.fc[0].weight.T + se.fc[0].bias)
    gate = (hidden @ se.fc[2].weight.T + se.fc[2].bias).clamp(0, 1)
    torch.testing.assert_close(se(x), x * gate[:, :, None, None])


def test_se_layer_rejects_bad_sizes() -> None:
    with pytest.raises(ConfigError, match="channels must be a positive int; got 0"):
        SELayer(0)
    with pytest.raises(ConfigError, match="reduction"):
        SELayer(8, reduction=0)


@pytest.mark.parametrize(
    ("in_ch", "mid", "out", "stride", "use_se"),
    [(16, 32, 16, 1, False), (16, 48, 24, 2, True), (24, 72, 24, 1, True)],
)
def test_ghost_bottleneck_shapes_and_training(in_ch, mid, out, stride, use_se) -> None:
    block = GhostBottleneck(in_ch, mid, out, stride=stride, use_se=use_se)
    x = torch.randn(2, in_ch, 16, 16)
    y = block(x)
    assert y.shape == (2, out, 16 // stride, 16 // stride)
    y.sum().backward()
    assert all(p.grad is not None for p in block.parameters())
    assert isinstance(block.ghost1, GhostModule) and isinstance(block.ghost2, GhostModule)
    assert isinstance(block.ghost1.act, nn.ReLU) and isinstance(block.ghost2.act, nn.Identity)
    assert isinstance(block.shortcut, nn.Identity) == (in_ch == out and stride == 1)


def test_identity_shortcut_adds_the_input() -> None:
    block = GhostBottleneck(8, 16, 8).eval()
    x = torch.randn(1, 8, 6, 6)
    torch.testing.assert_close(block(x) - x, block.ghost2(block.se(block.ghost1(x))))


def test_ghost_bottleneck_rejects_bad_stride() -> None:
    with pytest.raises(ConfigError, match="stride must be 1 or 2; got 3"):
        GhostBottleneck(8, 16, 8, stride=3)
