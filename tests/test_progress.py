"""Progress bars: on stderr when asked or watched, never under pytest or on another rank."""

from __future__ import annotations

import sys

import pytest
import torch
import torchvision

import ghostify
from ghostify import ConfigError
from ghostify.progress import shown


def small_model() -> torch.nn.Module:
    return torchvision.models.resnet18(num_classes=10)


def test_forced_bars_name_every_step(capsys) -> None:
    model = ghostify.convert(small_model(), example_inputs=torch.randn(1, 3, 32, 32), progress=True)
    err = capsys.readouterr().err
    for step in ("discovering convolutions", "fitting GhostModules", "checking"):
        assert f"ghostify: {step}" in err
    ghostify.report(model, torch.randn(1, 3, 32, 32), progress=True)
    assert "ghostify: counting MACs" in capsys.readouterr().err


@pytest.mark.parametrize("progress", [False, None])
def test_silent_when_off_and_under_pytest(progress, capsys, monkeypatch) -> None:
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)  # even in a terminal
    x = torch.randn(1, 3, 32, 32)
    model = ghostify.convert(small_model(), example_inputs=x, progress=progress)
    ghostify.report(model, x, progress=progress)
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


def test_auto_means_a_terminal_outside_pytest(monkeypatch) -> None:
    monkeypatch.delenv("PYTEST_CURRENT_TEST")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert not shown(None)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert shown(None)
    assert not shown(False) and shown(True)


def test_only_rank_zero_draws(monkeypatch) -> None:
    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    assert not shown(True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 0)
    assert shown(True)


def test_report_still_takes_a_callback(capsys) -> None:
    model = ghostify.convert(small_model(), init="scratch", progress=False)
    messages: list[str] = []
    ghostify.report(model, torch.randn(1, 3, 32, 32), progress=messages.append)
    assert any("fvcore" in message for message in messages) and len(messages) == 4
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("progress", ["yes", 1, 0.5])
def test_a_bad_progress_value_is_named(progress) -> None:
    with pytest.raises(ConfigError, match=r"progress must be None .*True or False; got"):
        ghostify.convert(small_model(), init="scratch", progress=progress)
    with pytest.raises(ConfigError, match="progress must be"):
        ghostify.report(small_model(), torch.randn(1, 3, 32, 32), progress=progress)
