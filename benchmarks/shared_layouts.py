"""What one layout per residual stream costs in fit quality, and what it saves in time.

    python benchmarks/shared_layouts.py            # everything below
    python benchmarks/shared_layouts.py --quick    # resnet18 + resnet50 residuals, digits ResNet-18
    python benchmarks/shared_layouts.py --timing   # also time ResNet-50 deployed, shared vs not

Three tables:

- ``residual``: for every channel group with two or more GhostModule writers of full-size maps
  (``ghostify.surgery.coupling``), the data-free filter residual of the writers with their own
  layouts and with one shared layout (``ghostify.fit.fit_group``), per zoo model (torchvision,
  random weights, seeded). ``cost`` is the shared summed relative residual over the own one.
- ``trained``: the digits teachers of ``benchmarks/knowledge.py`` (trained here, real data):
  the same costs on trained weights, and agreement with the teacher on the held-out digits
  after a data-free and a calibrated conversion (512 unlabeled training images), with shared
  layouts (``convert``'s default) and with every layer's own (``share_layouts=False``).
- ``timing`` (``--timing``): ResNet-50 deployed, batch 1 and 8, the default conversion against
  ``share_layouts=False`` (interleaved medians, same process).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torchvision
from torch import nn

import ghostify
from ghostify.fit import fit_group
from ghostify.fit.shared import SHARING_TOLERANCE
from ghostify.surgery.coupling import find_groups
from ghostify.surgery.discovery import discover
from ghostify.testing.results import Table, write_results

ZOO = ("resnet18", "resnet50", "resnext50_32x4d", "regnet_y_400mf", "mobilenet_v2")


def group_costs(model: nn.Module, ratio: int = 2) -> list[dict]:
    """Own and shared residuals of each multi-writer group ``convert`` would fit together."""
    probe = ghostify.convert(copy.deepcopy(model), ratio=ratio, init="scratch", progress=False)
    converted = {row.name for row in ghostify.record_of(probe).layers}
    found = discover(model)
    rows = []
    for group in find_groups(model, found.graphs, converted).groups:
        writers = [n for n in group.writers if n in converted and n not in group.pooled]
        if not group.free or len(writers) < 2:
            continue
        originals = [model.get_submodule(name) for name in writers]
        ghosts = [ghostify.GhostModule.like(conv, ratio=ratio, empty=True) for conv in originals]
        outcome = fit_group(originals, ghosts, exact=True)
        rows.append(
            {
                "group": group.index,
                "channels": group.channels,
                "writers": len(writers),
                "own": statistics.mean(outcome.exact_own),
                "shared": statistics.mean(outcome.exact_joint),
                "cost": outcome.exact_cost,
                "estimate": outcome.cost,
                "kept": outcome.shared,
            }
        )
    return rows


def residual_table(models: list[str]) -> Table:
    rows = []
    for name in models:
        torch.manual_seed(0)
        model = getattr(torchvision.models, name)().eval()
        costs = group_costs(model)
        print(f"{name}: {len(costs)} groups", flush=True)
        for row in costs:
            print(f"  group {row['group']}: {row}", flush=True)
        for row in costs:
            rows.append(
                [
                    name,
                    row["group"],
                    row["channels"],
                    row["writers"],
                    row["own"],
                    row["shared"],
                    row["cost"],
                    row["estimate"],
                    "shared" if row["kept"] else "own",
                ]
            )
    return Table(
        "residual",
        "Data-free fit residual of each residual stream's writers: own layouts vs one shared",
        [
            "model",
            "group",
            "channels",
            "writers",
            "own residual",
            "shared residual",
            "cost",
            "estimated cost",
            f"decision (x{1 + SHARING_TOLERANCE:.2f} allowed)",
        ],
        rows,
        "Mean relative filter residual (squared, over each writer's whole weight) of the "
        "GhostModules writing into one channel group, fitted layouts, ratio 2, torchvision "
        "random weights (seeded). cost: the group's summed shared residual over its summed own "
        "residual; estimated cost: the same from the kept filters' scaled-copy residuals, "
        "on which convert decides.",
    )


def agreement(model: nn.Module, teacher: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == teacher(x).argmax(1)).float().mean())


def trained_table(archs: list[str], tasks: list[str], ratios: list[int], epochs: int) -> Table:
    import knowledge  # benchmarks/knowledge.py: the digits teachers and their data

    rows = []
    for task in tasks:
        data = knowledge.task_data(task)
        train_x, _, test_x, test_y = data
        for arch in archs:
            teacher = knowledge.train_teacher(arch, task, data, epochs).eval()
            accuracy = float((teacher(test_x).argmax(1) == test_y).float().mean())
            for ratio in ratios:
                costs = group_costs(teacher, ratio)
                row = [task, arch, ratio, f"{100 * accuracy:.1f}", len(costs)]
                row.append(max((c["cost"] for c in costs), default=None))
                for share in (True, False):
                    model = convert_teacher(teacher, ratio, share, None)
                    row.append(100 * agreement(model, teacher, test_x))
                model = convert_teacher(teacher, ratio, True, train_x[:512])
                layers = ghostify.record_of(model).layers
                shared = {layer.channel_group for layer in layers if layer.layout == "shared"}
                row.append(f"{len(shared)} of {len(costs)}")
                row.append(100 * agreement(model, teacher, test_x))
                with data_free_sharing():
                    model = convert_teacher(teacher, ratio, True, train_x[:512])
                row.append(100 * agreement(model, teacher, test_x))
                model = convert_teacher(teacher, ratio, False, train_x[:512])
                row.append(100 * agreement(model, teacher, test_x))
                print(row, flush=True)
                rows.append(row)
    return Table(
        "trained",
        "Trained digits teachers: sharing's fit cost and agreement with the teacher",
        [
            "task",
            "teacher",
            "ratio",
            "teacher accuracy %",
            "groups",
            "data-free cost max",
            "data-free: shared %",
            "own %",
            "calibrated: groups shared",
            "shared, decided on the data %",
            "shared, decided data-free %",
            "own %",
        ],
        rows,
        "Agreement (top-1 with the teacher) on the held-out images. Teachers and data as in "
        "benchmarks/knowledge.py; calibrated: 512 unlabeled training images. 'decided on the "
        "data' is convert's default (each stream's layout chosen again on activations, shared "
        "where that costs at most x1.25); 'decided data-free' skips that step (an ablation: "
        "the data-free shared layouts, kept through the calibration); 'own': "
        "share_layouts=False.",
    )


def convert_teacher(teacher: nn.Module, ratio: int, share: bool, data: torch.Tensor | None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the trained-weights warning of a data-free run
        return ghostify.convert(
            copy.deepcopy(teacher),
            ratio=ratio,
            share_layouts=share,
            calibration_data=data,
            progress=False,
        ).eval()


@contextmanager
def data_free_sharing() -> Iterator[None]:
    """The calibration without its decision on the data (an ablation, for the table only)."""
    from ghostify import pipeline

    real = pipeline.share_on_activations
    pipeline.share_on_activations = lambda swapped, calibration: None
    try:
        yield
    finally:
        pipeline.share_on_activations = real


def deployed(model: nn.Module, share: bool, x: torch.Tensor) -> nn.Module:
    torch.manual_seed(0)
    converted = ghostify.convert(copy.deepcopy(model), share_layouts=share, progress=False)
    return ghostify.deploy(converted.eval(), x)


@contextmanager
def machine_lock() -> Iterator[None]:
    """The shared box's lock for runs whose timings are quoted (see the project's brief)."""
    import fcntl

    with open("/tmp/ghostify-heavy.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def timing_table(rounds: int) -> Table:
    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval()
    rows = []
    for batch in (1, 8):
        x = torch.randn(batch, 3, 224, 224)
        forms = {"shared": deployed(model, True, x), "own": deployed(model, False, x)}
        times: dict[str, list[float]] = {name: [] for name in forms}
        with torch.no_grad():
            for form in forms.values():
                form(x)
            for _ in range(rounds):
                for name, form in forms.items():
                    start = time.perf_counter()
                    form(x)
                    times[name].append(time.perf_counter() - start)
        shared, own = (1000 * statistics.median(times[n]) for n in ("shared", "own"))
        copies = [
            sum(
                m.channel_order is not None
                for m in form.modules()
                if isinstance(m, ghostify.GhostModule)
            )
            for form in forms.values()
        ]
        rows.append([batch, copies[0], copies[1], shared, own, own / shared])
        print(rows[-1], flush=True)
    return Table(
        "timing",
        "ResNet-50 deployed: shared layouts vs each layer's own",
        ["batch", "gathering layers (shared)", "(own)", "shared ms", "own ms", "own / shared"],
        rows,
        f"Medians of {rounds} interleaved runs, 224x224, ratio 2, after ghostify.deploy.",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(ZOO))
    parser.add_argument("--archs", default="resnet18", help="digits teachers (knowledge.py)")
    parser.add_argument("--tasks", default="digits,hard")
    parser.add_argument("--ratios", default="2,4")
    parser.add_argument("--teacher-epochs", type=int, default=12)
    parser.add_argument("--timing", action="store_true")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2, help="torch threads for the timing")
    parser.add_argument("--quick", action="store_true")
    options = parser.parse_args()
    if options.quick:
        options.models, options.archs, options.tasks, options.ratios = (
            "resnet18,resnet50",
            "resnet18",
            "digits",
            "2",
        )
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    tables = [residual_table(options.models.split(","))]
    tables.append(
        trained_table(
            options.archs.split(","),
            options.tasks.split(","),
            [int(r) for r in options.ratios.split(",")],
            options.teacher_epochs,
        )
    )
    if options.timing:
        torch.set_num_threads(options.threads)
        with machine_lock():
            tables.append(timing_table(options.rounds))
    print(write_results("shared_layouts", tables))


if __name__ == "__main__":
    main()
