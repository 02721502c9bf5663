"""Calibrated conversion at scale: time in forward passes, memory against the budget, and what the
bounded methods and position sampling cost in fit quality.

    python benchmarks/calibration_scale.py [--quick] [--parts resnet,audio,bounded,sampling]
        [--images 256] [--budget-gib 8] [--threads 2]

- ``resnet``: ResNet-50 (torchvision, random weights, BatchNorm statistics of the data as a
  trained network has), 224x224, ``--images`` smooth random images, ratio 2: one forward pass of
  the original over those images and the calibrated conversion, side by side in this process;
  peak resident memory of the process during the conversion (sampled every 10 ms), the most the
  calibration held by its own count, and the budget. (No quality figure: agreement with a
  random network says little; the sampling part and the trained-network benchmark measure it.)
- ``audio``: a network around ``nn.Conv2d(1024, 128, (64, 1))`` on (N, C, T, 1) frames, calibrated
  within a 4 GiB budget: which method each layer took, peak resident memory of the process, and
  the held-out output error of the data-free and the calibrated conversion.
- ``bounded``: on layers where both fit, the intrinsic refit by conjugate gradients and with no
  refit against the exact solve: relative output error on the calibration data and held out.
- ``sampling``: the knowledge benchmark's ResNet-18 trained on digits, calibrated with fewer or
  more sampled positions (ratio 2, and 4 at the defaults): test agreement and accuracy, time.

``--quick`` shrinks every part (fewer images, smaller inputs) to check the script runs.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import torch
import torchvision
from torch import nn

import ghostify
from ghostify import Calibration
from ghostify.fit.data_driven import refit_filters
from ghostify.fit.ridge_cg import refit_filters_cg
from ghostify.fit.statistics import InputStatistics
from ghostify.testing.results import Table, read_results, write_results

GIB = 2**30
BENCHMARKS = Path(__file__).resolve().parent


class PeakMemory:
    """Peak resident memory of this process while inside (sampled every 10 ms)."""

    def __enter__(self) -> PeakMemory:
        self.process = psutil.Process()
        self.before = self.process.memory_info().rss
        self.peak = self.before
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def timed(work: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = work()
    return time.perf_counter() - start, result


def smooth(shape: tuple[int, ...], seed: int, dims: tuple[int, ...]) -> torch.Tensor:
    """Random inputs correlated along ``dims`` (like images or sounds), standardised."""
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    for dim in dims:
        x = x.cumsum(dim) / x.shape[dim] ** 0.5
    return (x - x.mean()) / x.std()


def with_data_statistics(model: nn.Module, data: torch.Tensor, batch: int = 64) -> nn.Module:
    """BatchNorm running statistics of ``data`` (exact averages), as a trained network has."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None
    with torch.no_grad():
        model.train()
        for part in data.split(batch):
            model(part)
    return model.eval()


def forward_seconds(model: nn.Module, data: torch.Tensor, batch: int) -> float:
    with torch.no_grad():
        model(data[:2])  # warm-up
        seconds, _ = timed(lambda: [model(part) for part in data.split(batch)])
    return seconds


def output_error(student: nn.Module, teacher: nn.Module, data: torch.Tensor) -> tuple[float, float]:
    """Relative output error (to the outputs' spread) and top-1 agreement on ``data``."""
    with torch.no_grad():
        want = torch.cat([teacher(part) for part in data.split(64)])
        got = torch.cat([student.eval()(part) for part in data.split(64)])
    error = float((got - want).norm() / (want - want.mean(0)).norm())
    agreement = float((got.argmax(1) == want.argmax(1)).float().mean())
    return error, agreement


def fmt_gib(count: float) -> str:
    return f"{count / GIB:.2f}"


# -- ResNet-50 ----------------------------------------------------------------------------------


def resnet_part(args: argparse.Namespace) -> list[Table]:
    images, size = (16, 96) if args.quick else (args.images, 224)
    torch.manual_seed(0)
    data = smooth((images, 3, size, size), 1, (2, 3))
    model = with_data_statistics(torchvision.models.resnet50(), data[:64])
    forward = forward_seconds(model, data, 64)
    budget = int(args.budget_gib * GIB)
    calibration = Calibration(data, batch_size=64, memory_budget=budget, progress=args.progress)
    student = copy.deepcopy(model)
    with PeakMemory() as memory:
        seconds, _ = timed(lambda: ghostify.convert(student, calibration_data=calibration))
    summary = calibration.summary
    methods: dict[str, int] = {}
    for plan in summary.layers.values():
        head = plan.method.split(";")[0]
        methods[head] = methods.get(head, 0) + 1
    row = [
        f"ResNet-50, {size}x{size}",
        images,
        round(forward, 1),
        round(seconds, 1),
        round(seconds / forward, 2),
        fmt_gib(memory.peak),
        fmt_gib(memory.peak - memory.before),
        fmt_gib(summary.peak_held),
        fmt_gib(summary.budget),
        fmt_gib(summary.spilled),
        ", ".join(f"{k} {v}" for k, v in sorted(methods.items())),
    ]
    print("resnet", row, flush=True)
    return [
        Table(
            "resnet50_time",
            "ResNet-50 calibrated conversion (ratio 2) against one forward pass over the same data",
            [
                "model",
                "images",
                "forward s",
                "calibration s",
                "ratio",
                "peak RSS GiB",
                "RSS growth GiB",
                "held GiB",
                "budget GiB",
                "spilled GiB",
                "fit methods",
            ],
            [row],
            "Same process, side by side; random weights with BatchNorm statistics of the data. "
            "held: activations the calibration kept at once, by its own count.",
        ),
    ]


# -- the audio-shaped network -----------------------------------------------------------------


def audio_net(channels: int, kernel: int) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(80, channels, (3, 1), padding=(1, 0)),
        nn.BatchNorm2d(channels),
        nn.ReLU(),
        nn.Conv2d(channels, 128, (kernel, 1)),
        nn.BatchNorm2d(128),
        nn.ReLU(),
        nn.Conv2d(128, 128, (3, 1), padding=(1, 0)),
        nn.BatchNorm2d(128),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(128, 10),
    )


def audio_part(args: argparse.Namespace) -> list[Table]:
    channels, kernel, samples, frames = (
        (256, 16, 64, 48) if args.quick else (1024, 64, args.audio_samples, 128)
    )
    data = smooth((samples, 80, frames, 1), 3, (2,))
    held_out = smooth((samples // 2, 80, frames, 1), 4, (2,))
    model = with_data_statistics(audio_net(channels, kernel), data)
    budget = 4 * GIB
    calibration = Calibration(data, batch_size=32, memory_budget=budget, progress=args.progress)
    student = copy.deepcopy(model)
    with PeakMemory() as memory:
        seconds, _ = timed(lambda: ghostify.convert(student, calibration_data=calibration))
    data_free = ghostify.convert(copy.deepcopy(model))
    free_error, _ = output_error(data_free, model, held_out)
    error, _ = output_error(student, model, held_out)
    layers = calibration.summary.layers
    rows = [[name, plan.method, round(plan.error, 4)] for name, plan in layers.items()]
    summary = [
        f"Conv2d({channels}, 128, ({kernel}, 1)) net, {samples} x (80, {frames}, 1)",
        round(seconds, 1),
        fmt_gib(budget),
        fmt_gib(memory.peak),
        fmt_gib(calibration.summary.peak_held),
        round(free_error, 4),
        round(error, 4),
    ]
    print("audio", summary, rows, flush=True)
    return [
        Table(
            "audio",
            "Audio-shaped network calibrated within a 4 GiB budget (ratio 2)",
            [
                "network",
                "calibration s",
                "budget GiB",
                "peak RSS GiB",
                "held GiB",
                "held-out error, data-free",
                "held-out error, calibrated",
            ],
            [summary],
            "Peak RSS: the whole process during the conversion. Error: relative to the spread "
            "of the original's outputs.",
        ),
        Table(
            "audio_layers",
            "Audio-shaped network: each converted layer's fit method and its relative output "
            "error on the calibration data",
            ["layer", "fit method", "error"],
            rows,
        ),
    ]


# -- bounded methods against the exact solve --------------------------------------------------


def _layer_error(conv: nn.Module, weight: torch.Tensor, bias, data) -> float:
    """Relative output error of ``conv`` with these filters against the targets in ``data``."""
    total = energy = 0.0
    with torch.no_grad():
        for x, y in data:
            out = nn.functional.conv2d(
                x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups
            )
            total += float((out - y).square().sum())
            energy += float(y.square().sum())
    return (total / energy) ** 0.5


def _bounded_rows(title: str, conv: nn.Module, size: tuple[int, int], quick: bool) -> list:
    torch.manual_seed(0)
    n = 32 if quick else 256
    dims = (2, 3) if size[1] > 1 else (2,)
    clean = smooth((n, conv.in_channels, *size), 5, dims)
    held = smooth((n, conv.in_channels, *size), 6, dims)
    with torch.no_grad():
        pairs = [(x + 0.3 * torch.randn_like(x), conv(x)) for x in clean.split(32)]
        held_pairs = [(x + 0.3 * torch.randn_like(x), conv(x)) for x in held.split(32)]

    def exact_refit() -> Any:
        sums = InputStatistics(conv)
        for x, y in pairs:
            sums.update(x, y)
        return refit_filters(sums, conv, 0.05)

    seconds, exact = timed(exact_refit)
    variants = [("exact input Gram", exact.weight, exact.bias, seconds, "")]
    for tolerance in (1e-2, 1e-3):
        seconds, result = timed(
            lambda t=tolerance: refit_filters_cg(conv, lambda: iter(pairs), 0.05, tolerance=t)
        )
        name = f"conjugate gradients, tolerance {tolerance:g}"
        variants.append((name, result.weight, result.bias, seconds, f"{result.iterations} it."))
    variants.append(("no refit (original filters)", conv.weight, conv.bias, 0.0, ""))
    rows = []
    for name, weight, bias, seconds, note in variants:
        rows.append(
            [
                title,
                name,
                round(_layer_error(conv, weight, bias, pairs), 4),
                round(_layer_error(conv, weight, bias, held_pairs), 4),
                round(seconds, 2),
                note,
            ]
        )
        print("bounded", rows[-1], flush=True)
    return rows


def bounded_part(args: argparse.Namespace) -> list[Table]:
    """The refit of one layer fed noisy inputs (what a partially converted model feeds it)."""
    cases = [
        ("Conv2d(128, 64, (16, 1)) on (T, 1) frames", nn.Conv2d(128, 64, (16, 1)), (80, 1)),
        ("Conv2d(64, 64, 3x3) on 28x28", nn.Conv2d(64, 64, 3, padding=1), (28, 28)),
    ]
    if args.quick:
        cases = [("Conv2d(32, 16, (8, 1))", nn.Conv2d(32, 16, (8, 1)), (24, 1))]
    rows = [row for case in cases for row in _bounded_rows(*case, args.quick)]
    return [
        Table(
            "bounded",
            "Intrinsic refit of one layer on noisy inputs: bounded methods against the exact solve",
            ["layer", "method", "error (calibration)", "error (held out)", "seconds", "notes"],
            rows,
            "Inputs: smooth random maps plus 30% noise; targets: the layer's output on the "
            "clean maps. Ridge strength 0.05 (the default).",
        )
    ]


# -- position sampling ------------------------------------------------------------------------


def sampling_part(args: argparse.Namespace) -> list[Table]:
    """On a trained network (the knowledge benchmark's ResNet-18 digits teacher, cached in
    benchmarks/out/teachers or trained there): agreement after calibration, by sampling."""
    spec = importlib.util.spec_from_file_location("knowledge", BENCHMARKS / "knowledge.py")
    knowledge = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(knowledge)  # type: ignore[union-attr]
    data = knowledge.task_data("digits")
    teacher = knowledge.train_teacher("resnet18", "digits", data, 12)
    calibration_images = data[0][: 64 if args.quick else 512]
    test_x, test_y = data[2], data[3]

    def number(text: str) -> int | None:
        return None if text == "all" else int(text)

    settings = [
        (int(r), number(layout), number(per_weight))
        for r, layout, per_weight in (item.split(":") for item in args.sampling.split(","))
    ]
    if args.quick:
        settings = settings[:2]
    with torch.no_grad():
        teacher_accuracy = float((teacher(test_x).argmax(1) == test_y).float().mean())
    rows = []
    for ratio, layout, per_weight in settings:
        calibration = Calibration(
            calibration_images,
            batch_size=64,
            layout_positions=layout,
            refit_positions_per_weight=per_weight,
            progress=args.progress,
        )
        student = copy.deepcopy(teacher)
        seconds, _ = timed(
            lambda c=calibration, s=student, r=ratio: ghostify.convert(
                s, ratio=r, calibration_data=c
            )
        )
        error, agreement = output_error(student, teacher, test_x)
        with torch.no_grad():
            accuracy = float((student(test_x).argmax(1) == test_y).float().mean())
        rows.append(
            [
                ratio,
                "all" if layout is None else layout,
                "all" if per_weight is None else per_weight,
                round(error, 4),
                f"{100 * agreement:.1f}%",
                f"{100 * accuracy:.1f}%",
                round(seconds, 1),
            ]
        )
        print("sampling", rows[-1], flush=True)
    return [
        Table(
            "sampling",
            f"ResNet-18 trained on digits (16x16; teacher {100 * teacher_accuracy:.1f}% test "
            f"accuracy), calibrated on {len(calibration_images)} unlabeled training images: "
            "sampled positions against what is kept",
            [
                "ratio",
                "layout positions",
                "refit positions per weight",
                "logit error (test)",
                "agreement (test)",
                "accuracy (test)",
                "seconds",
            ],
            rows,
            "Defaults: 8192 layout positions, 4 per weight for the input Gram; agreement: "
            f"top-1 with the original on the {len(test_x)} test images.",
        )
    ]


PARTS = {
    "resnet": resnet_part,
    "audio": audio_part,
    "bounded": bounded_part,
    "sampling": sampling_part,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: check the script runs")
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--audio-samples", type=int, default=256)
    parser.add_argument("--budget-gib", type=float, default=8.0, help="ResNet-50's budget")
    parser.add_argument(
        "--sampling",
        default="2:8192:4,2:8192:16,2:8192:2,2:2048:4,2:all:all,4:8192:4,4:all:all",
        help="the sampling part's runs: ratio:layout_positions:refit_positions_per_weight,...",
    )
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--no-write", action="store_true", help="print, do not write results")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tables: list[Table] = []
    for part in args.parts.split(","):
        if part not in PARTS:
            sys.exit(f"unknown part {part!r}; choose from {', '.join(PARTS)}")
        tables += PARTS[part](args)
    if not args.no_write:
        write_merged(tables)


def write_merged(tables: list[Table]) -> None:
    """Write this run's tables, keeping the other parts' tables of an earlier run (each part
    fits in a few minutes; the whole would not): their command and date are kept beside them."""
    fresh = {table.id for table in tables}
    earlier: dict[str, Any] = {}
    kept: list[Table] = []
    try:
        previous = read_results("calibration_scale")
    except (OSError, ValueError):
        previous = None
    if previous is not None:
        kept = [table for table in previous.tables if table.id not in fresh]
        carried = previous.conditions.get("earlier_tables", {})
        for table in kept:
            earlier[table.id] = carried.get(
                table.id, {"command": previous.command, "date": previous.date}
            )
    conditions = {"earlier_tables": earlier} if earlier else {}
    write_results("calibration_scale", kept + tables, conditions=conditions)


if __name__ == "__main__":
    main()
