"""Stage-wise calibration: the weights of the per-layer passes, from a fixed number of model
calls whatever the depth, within a memory budget, with shared layouts kept."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import ghostify
from ghostify import Calibration, GhostModule
from ghostify.errors import CalibrationMemoryError
from ghostify.surgery.discovery import discover
from ghostify.surgery.swap import transaction
from ghostify.tune.calibrate import calibrate_conversion
from ghostify.tune.settings import as_calibration

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
NORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
POOL = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}
SIZE = {1: (24,), 2: (10, 10), 3: (4, 6, 6)}

# A fixed budget: the default follows the memory available, which moves on a shared box,
# and with it the fit methods the plan picks.
GIB = 2**30


class Residual(nn.Module):
    def __init__(self, c: int, dims: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = CONV[dims](c, c, 3, padding=1, bias=False), NORM[dims](c)
        self.conv2, self.bn2 = CONV[dims](c, c, 3, padding=1, bias=False), NORM[dims](c)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x  # in place, on a value the teacher shares before the first converted layer
        return self.relu(out)


class Branches(nn.Module):
    def __init__(self, c: int, dims: int) -> None:
        super().__init__()
        self.a, self.b = CONV[dims](c, c, 1), CONV[dims](c, c, 3, padding=1)
        self.bn = NORM[dims](2 * c)
        self.mix = CONV[dims](2 * c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix(torch.relu(self.bn(torch.cat([self.a(x), self.b(x)], dim=1))))


class Untraceable(nn.Module):
    """Its forward branches on a value, so fx cannot trace it (or any model holding it)."""

    def __init__(self, c: int, dims: int) -> None:
        super().__init__()
        self.conv, self.bn = CONV[dims](c, c, 3, padding=1), NORM[dims](c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > -1e30:
            x = x + 0
        return torch.relu(self.bn(self.conv(x)))


class Net(nn.Module):
    def __init__(self, dims: int = 2, blocks: int = 1, untraceable: bool = True) -> None:
        super().__init__()
        c = 16
        self.stem = nn.Sequential(CONV[dims](3, c, 3, padding=1), NORM[dims](c), nn.ReLU())
        self.blocks = nn.Sequential(*[Residual(c, dims) for _ in range(blocks)])
        self.branches = Branches(c, dims)
        self.odd = Untraceable(c, dims) if untraceable else nn.Identity()
        self.head = nn.Sequential(POOL[dims](1), nn.Flatten(), nn.Linear(c, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.odd(self.branches(self.blocks(self.stem(x)))))


def trained(model: nn.Module, data: torch.Tensor) -> nn.Module:
    """BatchNorm statistics of the data (as a trained network has), eval mode."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = None
    with torch.no_grad():
        model.train()(data)
    return model.eval()


def smooth(n: int, dims: int, seed: int = 0) -> torch.Tensor:
    x = torch.randn(n, 3, *SIZE[dims], generator=torch.Generator().manual_seed(seed))
    for dim in range(2, x.dim()):
        x = x.cumsum(dim) / x.shape[dim] ** 0.5
    return x


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_stagewise_gives_the_weights_of_the_per_layer_passes(dims: int) -> None:
    torch.manual_seed(dims)
    data = smooth(48, dims)
    model = trained(Net(dims), data)
    results = {}
    for stagewise in (True, False):
        calibration = Calibration(data, batch_size=16, stagewise=stagewise, memory_budget=GIB)
        converted = ghostify.convert(copy.deepcopy(model), calibration_data=calibration)
        results[stagewise] = (converted.state_dict(), calibration.summary.layers)
    (stagewise, layers), (per_layer, _) = results[True], results[False]
    assert stagewise.keys() == per_layer.keys()
    for key, value in stagewise.items():
        torch.testing.assert_close(value, per_layer[key], rtol=1e-5, atol=1e-6, msg=key)
    record = ghostify.record_of(converted)
    assert set(layers) == {row.name for row in record.layers} > {"odd.conv", "blocks.0.conv1"}
    for name, plan in layers.items():
        fallback = "per-layer fallback: outside the traced graphs" in plan.method
        assert fallback == (name == "odd.conv"), (name, plan.method)
        assert 0 < plan.error < 1


def count_calls(model: nn.Module, **options) -> int:
    """Forward calls of ``model`` and its frozen copy (it copies the hooks) in a calibration."""
    calls = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    data = smooth(32, 2)
    ghostify.convert(model, calibration_data=Calibration(data, batch_size=8, **options))
    return len(calls)


def test_model_calls_do_not_grow_with_depth() -> None:
    torch.manual_seed(0)
    shallow = count_calls(Net(blocks=1, untraceable=False))
    deep = count_calls(Net(blocks=5, untraceable=False))
    deeper = count_calls(Net(blocks=9, untraceable=False))
    # Checking batch 0, the execution order and the graph's own output; then none per batch.
    assert shallow == 3
    # From two blocks on, the residual stream's writers share one layout, chosen on the data
    # first (ghostify.tune.shared_layouts): one more pass over the 4 batches, at any depth.
    assert deep == deeper == 3 + 1 + 4
    # The per-layer path runs both models for every layer and batch (4 batches, 13 layers).
    assert count_calls(Net(blocks=5, untraceable=False), stagewise=False) > 100


def test_a_budget_too_small_is_refused_before_any_work() -> None:
    torch.manual_seed(0)
    data = smooth(32, 2)
    model = trained(Net(), data)
    before = copy.deepcopy(model.state_dict())
    calls = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    with pytest.raises(CalibrationMemoryError, match=r"calibrating '.*' needs at least") as error:
        ghostify.convert(model, calibration_data=Calibration(data, memory_budget=100_000))
    assert error.value.budget == 100_000 and error.value.needed > 100_000
    assert len(calls) <= 3  # the checks of the first batch only
    assert not any(isinstance(m, GhostModule) for m in model.modules())
    after = model.state_dict()
    assert all(torch.equal(after[key], value) for key, value in before.items())


def test_fixed_layouts_keep_the_layout_and_refit_the_kernels() -> None:
    torch.manual_seed(0)
    data = smooth(48, 2)
    model = trained(Net(untraceable=False), data)
    found = discover(model)
    names = ["blocks.0.conv1", "blocks.0.conv2", "branches.mix"]
    ghosts = {
        n: ghostify.fit(model.get_submodule(n), GhostModule.like(model.get_submodule(n)))
        for n in names
    }
    data_free = copy.deepcopy(ghosts["blocks.0.conv1"])
    order = ghosts["blocks.0.conv1"].output_position.clone()
    seen = []
    conv = model.get_submodule("blocks.0.conv1")
    handle = conv.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        model(data)
    handle.remove()
    calibration = as_calibration(Calibration(data, batch_size=16), model)
    with transaction(model) as changes:
        originals = {n: changes.replace_name(n, ghost) for n, ghost in ghosts.items()}
        calibrate_conversion(
            calibration,
            model,
            ghosts,
            originals,
            found.graphs,
            changes,
            fixed_layouts={"blocks.0.conv1"},
        )
    fixed = ghosts["blocks.0.conv1"]
    assert torch.equal(fixed.output_position, order)
    assert (
        "layout kept (shared with its residual stream)"
        in calibration.summary.layers["blocks.0.conv1"].method
    )
    # The first converted layer sees the original inputs: least squares on its kept layout beats
    # the data-free kernels there.
    x = seen[0]
    with torch.no_grad():
        want = conv(x)
        error_before = float((data_free(x) - want).norm() / want.norm())
        error_after = float((fixed(x) - want).norm() / want.norm())
    assert error_after < error_before
    assert error_after == pytest.approx(
        calibration.summary.layers["blocks.0.conv1"].error, rel=1e-4
    )


def test_the_record_and_the_report_say_how_each_layer_was_fitted() -> None:
    torch.manual_seed(0)
    data = smooth(32, 2)
    model = trained(Net(), data)
    calibration = Calibration(data, batch_size=16)
    converted = ghostify.convert(model, calibration_data=calibration)
    record = ghostify.record_of(converted)
    fitted = calibration.summary.layers
    for row in record.layers:
        assert row.fit_method == fitted[row.name].method
        assert row.fit_error == fitted[row.name].error
    assert record.layer("odd.conv").fit_method.startswith("exact; per-layer fallback")
    report = ghostify.report(converted, data[:2])
    rows = {row["name"]: row for row in report.to_dict()["layers"]}
    assert rows["odd.conv"]["fit_method"] == record.layer("odd.conv").fit_method
    assert rows["branches.mix"]["fit_error"] == pytest.approx(fitted["branches.mix"].error)
    assert "calibration fit" in str(report) and "calibration fit" in report.to_markdown()
    assert f"error {fitted['branches.mix'].error:.3f}, exact" in str(report)


class Shared(nn.Module):
    """One conv and one BatchNorm called twice per forward (weights shared across depth)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.shared, self.norm = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.last = nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.relu(self.norm(self.shared(x)))
        x = torch.relu(self.norm(self.shared(x)))
        return self.last(x).mean(dim=(2, 3))


def test_a_module_called_twice_takes_the_per_layer_path_inside_the_graph() -> None:
    torch.manual_seed(0)
    data = smooth(32, 2)
    model = trained(Shared(), data)
    results = {}
    for stagewise in (True, False):
        calibration = Calibration(data, batch_size=16, stagewise=stagewise, memory_budget=GIB)
        converted = ghostify.convert(copy.deepcopy(model), calibration_data=calibration)
        results[stagewise] = (converted.state_dict(), calibration.summary.layers)
    (stagewise, layers), (per_layer, _) = results[True], results[False]
    for key, value in stagewise.items():
        torch.testing.assert_close(value, per_layer[key], rtol=1e-5, atol=1e-6, msg=key)
    assert layers["shared"].method.endswith("per-layer fallback: called 2 times per forward")
    assert "fallback" not in layers["last"].method
