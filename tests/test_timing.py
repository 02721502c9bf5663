"""The timing database: cache keys (hardware, libraries, dtype, shape, layout), reuse, a corrupt
cache file, runtimes. No figure is asserted: only what was timed and what was reused."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import ghostify
from ghostify import ConfigError
from ghostify.timing import TimingCache, TimingDatabase, entry_key, environment, module_key

SHAPE = (1, 8, 12, 12)


def _database(tmp_path, **kwargs) -> TimingDatabase:
    return TimingDatabase(cache=tmp_path, rounds=2, min_sample_ms=0.1, **kwargs)


def _forms() -> dict[str, nn.Module]:
    conv = nn.Conv2d(8, 16, 3, padding=1)
    return {"conv": conv, "ghost": ghostify.GhostModule.like(conv)}


def test_same_key_hits_and_builds_nothing(tmp_path) -> None:
    first = _database(tmp_path)
    timed = first.time(_forms(), SHAPE)
    assert set(timed) == {"conv", "ghost"} and all(ms > 0 for ms in timed.values())
    assert (first.measured, first.reused) == (2, 0)

    def never_built() -> nn.Module:
        raise AssertionError("a cached form must not be built")

    second = _database(tmp_path)  # a new process would read the same file
    again = second.time({"conv": never_built, "ghost": never_built}, SHAPE)
    assert again == timed
    assert (second.measured, second.reused) == (0, 2)


@pytest.mark.parametrize(
    "change",
    [
        {"input_shape": (2, 8, 12, 12)},
        {"input_shape": (1, 8, 10, 12)},
        {"dtype": torch.float64},
        {"layout": "channels_last"},
    ],
)
def test_changed_shape_dtype_or_layout_misses(tmp_path, change) -> None:
    database = _database(tmp_path)
    database.time(_forms(), SHAPE)
    arguments = {"input_shape": SHAPE, **change}
    database.time(_forms(), arguments.pop("input_shape"), **arguments)
    assert (database.measured, database.reused) == (4, 0)


def test_environment_names_hardware_libraries_and_threads(monkeypatch, tmp_path) -> None:
    env = environment("eager")
    assert {"device", "threads", "torch", "ghostify_layers", "runtime"} <= set(env)
    assert environment("onnxruntime")["onnxruntime"]
    database = _database(tmp_path)
    database.time(_forms(), SHAPE)
    threads = torch.get_num_threads()
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads + 1)
    database.time(_forms(), SHAPE)  # another thread count is another environment
    assert database.measured == 4
    assert len(list(tmp_path.glob("*.json"))) == 2


def test_module_key_follows_configuration_not_weights() -> None:
    conv = nn.Conv2d(8, 16, 3, padding=1)
    same = nn.Conv2d(8, 16, 3, padding=1)
    assert module_key(conv) == module_key(same)
    assert module_key(conv) != module_key(nn.Conv2d(8, 16, 3, padding=1, stride=2))
    assert module_key(conv) != module_key(nn.Conv2d(8, 16, 3, padding=1, bias=False))
    ghost = ghostify.GhostModule.like(conv)
    assert module_key(ghost) != module_key(ghostify.GhostModule.like(conv, dw_size=1))
    ghost.set_channel_order(torch.arange(16).flip(0))  # a gather is more work
    assert module_key(ghost) != module_key(ghostify.GhostModule.like(conv))


def test_corrupt_cache_file_is_ignored_with_a_warning(tmp_path) -> None:
    database = _database(tmp_path)
    database.time(_forms(), SHAPE)
    (path,) = tmp_path.glob("*.json")
    path.write_text("{not json")
    fresh = _database(tmp_path)
    with pytest.warns(UserWarning, match="ignoring the timing cache file"):
        fresh.time(_forms(), SHAPE)
    assert fresh.measured == 2
    data = json.loads(path.read_text())  # rewritten whole
    assert len(data["entries"]) == 2


def test_cache_file_of_another_environment_is_not_trusted(tmp_path) -> None:
    database = _database(tmp_path)
    database.time(_forms(), SHAPE)
    (path,) = tmp_path.glob("*.json")
    data = json.loads(path.read_text())
    data["environment"]["device"] = "another machine"
    path.write_text(json.dumps(data))
    fresh = _database(tmp_path)
    with pytest.warns(UserWarning, match="environment does not match"):
        fresh.time(_forms(), SHAPE)
    assert fresh.measured == 2


def test_memory_only_cache_writes_no_file(tmp_path) -> None:
    database = TimingDatabase(cache=TimingCache(tmp_path, enabled=False), rounds=1)
    database.time(_forms(), SHAPE)
    database.time(_forms(), SHAPE)
    assert (database.measured, database.reused) == (2, 2)
    assert not list(tmp_path.iterdir())


def test_forms_given_are_not_changed(tmp_path) -> None:
    conv = nn.Conv2d(8, 16, 3, padding=1).train()
    before = conv.weight.clone()
    _database(tmp_path).time({"conv": conv}, SHAPE, layout="channels_last")
    assert conv.training and conv.weight.is_contiguous() and torch.equal(conv.weight, before)


def test_onnxruntime_runtime_times_the_exported_layer(tmp_path) -> None:
    database = _database(tmp_path, runtime="onnxruntime")
    timed = database.time(_forms(), SHAPE)
    assert all(ms > 0 for ms in timed.values())
    assert database.lookup("conv", SHAPE) == timed["conv"]
    eager = _database(tmp_path)
    assert eager.lookup("conv", SHAPE) is None  # another runtime, another environment


def test_bad_settings_are_config_errors(tmp_path) -> None:
    with pytest.raises(ConfigError, match="runtime must be one of"):
        TimingDatabase("tensorrt")
    with pytest.raises(ConfigError, match="layout must be one of"):
        _database(tmp_path).time(_forms(), SHAPE, layout="nhwc")
    with pytest.raises(ConfigError, match="rounds must be a positive int"):
        TimingDatabase(rounds=0)


def test_entry_key_names_every_part() -> None:
    key = entry_key("conv", (1, 8, 12, 12), torch.bfloat16, "channels_last")
    assert key == "conv|1x8x12x12|bfloat16|channels_last"


def test_a_minimum_seen_once_is_timed_again_until_seen_twice(monkeypatch) -> None:
    """On a fake clock: one call is fast once and slow after, so its minimum has no second
    sample within 5%; more rounds are run, up to 3 x rounds."""
    from ghostify.timing import measure

    now = [0.0]
    durations = {"steady": [], "noisy": []}

    def tick(name: str, seconds: list[float]):
        def call() -> None:
            step = seconds[min(len(durations[name]), len(seconds) - 1)]
            durations[name].append(step)
            now[0] += step

        return call

    monkeypatch.setattr(measure.time, "perf_counter", lambda: now[0])
    steady = tick("steady", [0.01])
    noisy = tick("noisy", [0.01] * 4 + [0.001] + [0.01])  # warm-up 2, repeats 1, round 1 fast
    times = measure.time_interleaved([steady, noisy], rounds=3, min_sample_ms=0.0)
    assert times == pytest.approx([10.0, 1.0])
    assert len(durations["noisy"]) == 3 + 9  # warm-up and the repeat probe, then 3 x 3 rounds
    confirmed = tick("steady", [0.01])
    durations["steady"].clear()
    measure.time_interleaved([confirmed], rounds=3, min_sample_ms=0.0)
    assert len(durations["steady"]) == 3 + 3  # settled by the first rounds
