"""fit_all: the pipelined data-free fit of many layers gives what fit gives layer by layer."""

from __future__ import annotations

import importlib
import time

import pytest
import threadpoolctl
import torch
from torch import nn

from ghostify import GhostModule, fit
from ghostify.fit import FitError, fit_all, fit_as_built

fit_package = importlib.import_module("ghostify.fit")  # ghostify.fit is also the function


def layers() -> list[nn.Module]:
    torch.manual_seed(0)
    return [
        nn.Conv2d(8, 32, 3, padding=1),
        nn.Conv2d(32, 48, 1, bias=False),
        nn.Conv2d(48, 48, 3, stride=2, groups=4),
        nn.Conv1d(6, 24, 5, dilation=2),
        nn.Conv3d(4, 16, 3),
    ]


def test_fit_all_matches_fit_layer_by_layer() -> None:
    convs = layers()
    one_by_one = [fit(conv, GhostModule.like(conv, ratio=3, empty=True)) for conv in convs]
    together = [GhostModule.like(conv, ratio=3, empty=True) for conv in convs]
    done = []
    fit_all(list(zip(convs, together, strict=True)), done.append)
    assert sorted(done) == list(range(len(convs)))  # each once, in the order they finish
    for a, b in zip(one_by_one, together, strict=True):
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
            assert torch.equal(x, y), name


def test_a_failing_layer_is_named_by_its_index(monkeypatch) -> None:
    convs = layers()
    real = fit_package.finish_layout
    calls = []

    def flaky(draft, slot):
        # Layers are fitted side by side: fail the third layer by its weight, not by call order.
        calls.append(draft)
        if draft.weight.data_ptr() == convs[2].weight.data_ptr():
            raise RuntimeError("simulated failure")
        return real(draft, slot)

    monkeypatch.setattr(fit_package, "finish_layout", flaky)
    pairs = [(conv, GhostModule.like(conv, empty=True)) for conv in convs]
    with pytest.raises(FitError, match="layer 2") as caught:
        fit_all(pairs)
    assert caught.value.index == 2
    assert "simulated failure" in str(caught.value.__cause__)


def test_of_several_failing_layers_the_first_is_named(monkeypatch) -> None:
    convs = layers()
    real = fit_package.finish_layout
    largest, first = convs[2].weight.data_ptr(), convs[1].weight.data_ptr()

    def flaky(draft, slot):
        # Layer 2 (the largest) starts first, beside layer 1, and fails first: layer 1 fails
        # later, and is the one named.
        if draft.weight.data_ptr() == first:
            time.sleep(0.3)
        if draft.weight.data_ptr() in (largest, first):
            raise RuntimeError("simulated failure")
        return real(draft, slot)

    monkeypatch.setattr(fit_package, "finish_layout", flaky)
    pairs = [(conv, GhostModule.like(conv, empty=True)) for conv in convs]
    with pytest.raises(FitError, match="layer 1"):
        fit_all(pairs)


def test_a_ghost_that_cannot_be_built_stops_the_fit_with_its_error() -> None:
    convs = layers()
    built = []

    def build(index: int) -> GhostModule:
        if len(built) == 2:
            raise ValueError(f"cannot build {index}")
        built.append(index)
        return GhostModule.like(convs[index], empty=True)

    fitted = []
    with pytest.raises(ValueError, match="cannot build"):
        fit_as_built(convs, build, fitted.append)
    assert set(fitted) <= set(built)  # nothing past the failure was queued


@pytest.mark.parametrize("threads", [1, 3])
def test_fit_all_gives_the_same_for_any_thread_count_and_restores_it(threads) -> None:
    convs = layers()
    one_by_one = [fit(conv, GhostModule.like(conv, ratio=2, empty=True)) for conv in convs]
    together = [GhostModule.like(conv, ratio=2, empty=True) for conv in convs]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fit_all(list(zip(convs, together, strict=True)))
        assert torch.get_num_threads() == threads  # borrowed for the fit, then given back
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one_by_one, together, strict=True):
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
            assert torch.equal(x, y), name


def test_a_failure_gives_the_thread_count_back(monkeypatch) -> None:
    convs = layers()
    before = torch.get_num_threads()

    def broken(draft, slot):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(fit_package, "finish_layout", broken)
    with pytest.raises(FitError):
        fit_all([(conv, GhostModule.like(conv, empty=True)) for conv in convs])
    assert torch.get_num_threads() == before


def test_numpy_blas_runs_on_one_thread_during_the_fit_and_is_given_back(monkeypatch) -> None:
    def blas_threads() -> list[int]:
        pools = threadpoolctl.threadpool_info()
        return [pool["num_threads"] for pool in pools if pool["user_api"] == "blas"]

    if not blas_threads():
        pytest.skip("numpy has no BLAS thread pool here")
    seen = []
    real = fit_package.choose_kept

    def watching(*args, **kwargs):
        seen.append(blas_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(fit_package, "choose_kept", watching)
    before = blas_threads()
    with threadpoolctl.threadpool_limits(2, user_api="blas"):
        wanted = blas_threads()
        fit_all([(conv, GhostModule.like(conv, empty=True)) for conv in layers()])
        assert blas_threads() == wanted  # given back after the fit
    assert blas_threads() == before
    assert len(seen) == len(layers())
    assert all(threads == [1] * len(wanted) for threads in seen), seen


def test_the_largest_layers_are_started_first(monkeypatch) -> None:
    """So that no big layer is left running alone at the end: with two workers, the first two
    layers to start are the two with the most fitting work, wherever they are in the model."""
    convs = [nn.Conv2d(8, 16, 1), nn.Conv2d(16, 16, 3), nn.Conv2d(64, 256, 3), nn.Conv2d(8, 8, 3)]
    convs.append(nn.Conv2d(32, 512, 1))  # the largest last, as in a ResNet
    started = []
    real = fit_package.choose_kept

    def recording(weight, *args, **kwargs):
        started.append(weight.shape[0])
        return real(weight, *args, **kwargs)

    monkeypatch.setattr(fit_package, "choose_kept", recording)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        fit_all([(conv, GhostModule.like(conv, empty=True)) for conv in convs])
    finally:
        torch.set_num_threads(before)
    assert sorted(started[:2]) == [256, 512]
    assert sorted(started) == [8, 16, 16, 256, 512]
