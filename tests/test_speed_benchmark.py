"""benchmarks/speed.py and ghost_forms.py: their pieces run (on the CPU, in the dtypes and
device-agnostic paths a GPU run takes), and the forms compute the same function."""

from __future__ import annotations

import copy

import pytest
import torch
from test_benchmarks import BENCHMARKS, load  # tests/test_benchmarks.py
from torch import nn

import ghostify


@pytest.fixture(scope="module")
def speed():
    return load(BENCHMARKS / "speed.py")


def test_cuda_defaults_and_refusals(speed) -> None:
    options = speed.parse(["--device", "cuda"])
    assert options.batches == [1, 32, 128] and options.dtypes == ["float32", "bfloat16"]
    assert options.runtimes == ["eager", "deploy", "compile"] and options.results == "speed-cuda"
    with pytest.raises(SystemExit):
        speed.parse(["--device", "cuda", "--runtimes", "ort"])
    assert speed.parse(["--quick"]).results == "speed-quick"


def test_inference_rows_in_bf16_on_the_cpu(speed, tmp_path) -> None:
    """The path a GPU run takes (deploy in float32, then cast), on the CPU."""
    args = "--models resnet18 --batches 1 --size 32 --repeats 1 --runtimes eager deploy"
    options = speed.parse([*args.split(), "--dtypes", "float32", "bfloat16"])
    table = speed.measure_inference(options, torch.device("cpu"), tmp_path)
    assert [row[2:4] for row in table.rows] == [
        ["float32", "eager"],
        ["float32", "deploy"],
        ["bfloat16", "eager"],
        ["bfloat16", "deploy"],
    ]
    assert all(row[4] > 0 and row[5] > 0 and row[7] > 1.5 for row in table.rows)


def test_best_original_is_fused_and_the_training_step_counts_memory(speed) -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.LazyLinear(1000)
    )
    x = torch.randn(2, 3, 12, 12)
    model(x)
    fused = speed.best_original(model.eval(), x)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-4, atol=1e-5)
    converted = ghostify.convert(copy.deepcopy(model), init="scratch", skip_stem=False)
    step, saved = speed.train_step(converted, x)
    _, original_saved = speed.train_step(copy.deepcopy(model), x)
    step()  # runs
    assert 0 < saved <= original_saved
    _, bf16_saved = speed.train_step(converted, x, torch.bfloat16)  # under autocast
    _, bf16_original_saved = speed.train_step(copy.deepcopy(model), x, torch.bfloat16)
    assert 0 < bf16_saved <= bf16_original_saved


def test_results_written_in_pieces_merge(tmp_path) -> None:
    """A long sweep run in pieces: each piece replaces its own rows and keeps the others."""
    from ghostify.testing.results import Table, read_results, write_results

    columns = ["model", "batch", "ms"]
    first = Table("inference", "t", columns, [["resnet50", 1, 10.0], ["resnet50", 8, 70.0]])
    write_results(
        "s", [first, Table("train-step", "t", columns, [["r", 8, 1.0]])], directory=tmp_path
    )
    again = Table("inference", "t", columns, [["resnet50", 8, 60.0], ["vgg16", 1, 5.0]])
    write_results("s", [again], directory=tmp_path, merge=True)
    results = read_results("s", tmp_path)
    assert results.table("inference").rows == [
        ["resnet50", 1, 10.0],
        ["resnet50", 8, 60.0],
        ["vgg16", 1, 5.0],
    ]
    assert results.table("train-step").rows == [["r", 8, 1.0]]
    write_results("s", [again], directory=tmp_path)  # without merge: only what was measured
    assert [t.id for t in read_results("s", tmp_path).tables] == ["inference"]
