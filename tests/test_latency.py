"""Per-layer truth: layers timed in the report, and only_faster keeps the slower ghosts out."""

from __future__ import annotations

import importlib

import pytest
import torch
import torchvision

import ghostify
from ghostify import ConfigError
from ghostify.surgery.latency import LayerLatency, time_layer

X = torch.randn(1, 3, 32, 32)


def test_time_layer_measures_both_forms() -> None:
    conv = torch.nn.Conv2d(16, 32, 3, padding=1)
    ghost = ghostify.GhostModule.from_conv(conv, init="scratch")
    timing = time_layer(conv, ghost, (1, 16, 20, 20), rounds=3)
    assert timing.original_ms > 0 and timing.ghost_ms > 0
    assert timing.speedup == pytest.approx(timing.original_ms / timing.ghost_ms)


def test_report_rows_carry_latency_only_when_asked() -> None:
    model = ghostify.convert(torchvision.models.resnet18(), init="scratch")
    plain = ghostify.report(model, X)
    assert all(row.ghost_ms is None for row in plain.layers)
    assert "time" not in plain.table().splitlines()[1]
    timed = ghostify.report(model, X, latency=True)
    assert all(row.original_ms > 0 and row.ghost_ms > 0 for row in timed.layers)
    assert timed.table().splitlines()[1].rstrip().endswith("time")
    assert "ms before | ms after" in timed.to_markdown()
    restored = ghostify.SavingsReport.from_json(timed.to_json())
    assert restored.layers[0].ghost_ms == timed.layers[0].ghost_ms


def test_only_faster_needs_inputs() -> None:
    with pytest.raises(ConfigError, match="only_faster=True needs example_inputs"):
        ghostify.convert(torchvision.models.resnet18(), only_faster=True)


def test_only_faster_keeps_the_layers_measured_slower(monkeypatch) -> None:
    """Decided by the measurement: make layer1's ghosts measure slower, the rest faster."""

    def fake(original, ghost, shape, rounds=7):
        slow = (original.in_channels, original.out_channels) == (64, 64)  # layer1's convs
        return LayerLatency(1.0, 2.0 if slow else 0.5)

    module = importlib.import_module("ghostify.surgery.convert")
    monkeypatch.setattr(module, "time_layer", fake)
    model = ghostify.convert(
        torchvision.models.resnet18(), init="scratch", example_inputs=X, only_faster=True
    )
    plan = ghostify.plan_of(model)
    slower = {row["name"] for row in plan["skipped"] if "not faster" in row["reason"]}
    assert slower == {f"layer1.{b}.conv{c}" for b in (0, 1) for c in (1, 2)}
    assert "layer2.0.conv1" in {row["name"] for row in plan["layers"]}
    assert plan["options"]["only_faster"] is True
