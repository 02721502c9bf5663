"""The benchmark scripts stay in step with the library: they are run by hand, so a change to an
API one of them uses must fail here rather than in a user's hands."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import nn

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"benchmark_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)  # the scripts run only under __main__
    return module


@pytest.mark.parametrize("path", sorted(BENCHMARKS.glob("*.py")), ids=lambda path: path.stem)
def test_every_benchmark_imports_and_has_a_main(path: Path) -> None:
    assert callable(load(path).main)


def test_fit_quality_measures_both_layouts() -> None:
    """The free layout (each ghost from its best kept filter) bounds the balanced one (one ghost
    per slot) from below; filters that are exact scaled pairs are fitted exactly by both."""
    fit_quality = load(BENCHMARKS / "fit_quality.py")
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 32, 3, padding=1)
    free, balanced = fit_quality.layer_residuals(conv, 2)
    assert 0 < free <= balanced < 1
    with torch.no_grad():
        conv.weight[16:] = -2.5 * conv.weight[:16]
    free, balanced = fit_quality.layer_residuals(conv, 2)
    assert balanced < 1e-3 and free <= balanced
    names = [
        name for name, _ in fit_quality.convertible(nn.Sequential(nn.Conv2d(3, 8, 3), conv), 2)
    ]
    assert names == ["1"]  # the 3-channel stem is left out


def test_trained_networks_merge_replaces_only_the_stages_measured_again(monkeypatch) -> None:
    """A run of some stages of a network keeps its other stages' rows (a finetune measured
    again once dropped the network's data-free and calibrated rows)."""
    from types import SimpleNamespace

    from ghostify.testing.results import Table

    trained = load(BENCHMARKS / "trained_networks.py")
    columns = ["network", "ratio", "stage", "agreement"]
    old_rows = [
        ["a", "-", "original", 1.0],
        ["a", 2, "+batchnorm", 0.9],
        ["a", 2, "+finetune", 0.7],
        ["b", 2, "+batchnorm", 0.5],
    ]
    layers = Table("layers-a", "old layers", ["network", "layer"], [["a", "conv2"]])
    old = SimpleNamespace(tables=[Table("summary", "t", columns, old_rows), layers], command="A")
    monkeypatch.setattr(trained, "read_results", lambda name: old)
    new = [
        Table("summary", "t", columns, [["a", "-", "original", 1.0], ["a", 2, "+finetune", 0.95]])
    ]
    tables, command = trained.merged(new, "B", {"a"})
    assert command == "A && B"
    assert sorted(map(str, tables[0].rows)) == sorted(
        map(str, [old_rows[0], old_rows[1], old_rows[3], ["a", 2, "+finetune", 0.95]])
    )
    assert tables[1] is layers  # tables the run did not write stay as they were
