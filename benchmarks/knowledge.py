"""What survives the conversion, and how fast distillation brings back the rest.

    python benchmarks/knowledge.py                 # everything (see --help for the subsets)
    python benchmarks/knowledge.py --quick         # digits, ResNet-18, ratio 2, 1 epoch
    python benchmarks/knowledge.py --report-only   # tables from the rows measured so far

Every run ends by writing benchmarks/results/knowledge.json (the docs' tables) from the rows of
benchmarks/out/knowledge.jsonl that the options select, so ``--report-only`` with the options
of the runs that measured them (or their union) writes what those runs measured.

Two tasks on real images that ship with scikit-learn: ``digits`` (8x8 handwritten digits,
upsampled to 16x16) and ``hard`` (the same digits, each copy randomly rotated, scaled, shifted,
dimmed and drowned in noise, a task the teachers get clearly below 99%). Two teachers trained
here: torchvision's ResNet-18 with a small-image stem (3x3 stride-1 conv, then its max-pool) and
a VGG-style plain network. For each ratio and each way to start, accuracy and agreement with the
teacher on the test set right after conversion and after 1 and 3 epochs of distillation
(``ghostify.finetune``, the same call for every start: AdamW at lr 1e-3 scaled by how far the
model starts from the teacher, cosine decay, KL on softened logits, no labels), with the wall
and CPU time of each stage. The 3-epoch figures continue from the 1-epoch model with a second
``finetune`` call of 2 epochs (its lr scaled again from where the model then is). Ways to start:

- ``scratch``: ``convert(init="scratch")``; ``weights``: the data-free fit;
- ``calibrated``: ``convert(calibration_data=512 unlabeled training images)``;
- ``calibrated+kd``: the same, with ``distill_steps`` of distillation on those images;
- ``pruning``: Torch-Pruning's magnitude pruner at the ghost model's MACs (same counter).

Results are appended to benchmarks/out/knowledge.jsonl as they come; teachers are cached in
benchmarks/out/teachers/ so a rerun only redoes the conversions.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import ghostify
from ghostify.testing import digits
from ghostify.testing.results import Table, write_results

OUT = Path(__file__).resolve().parent / "out"
RESULTS = OUT / "knowledge.jsonl"
METHODS = ("scratch", "weights", "calibrated", "calibrated+kd", "pruning")


def upsampled(images: torch.Tensor) -> torch.Tensor:
    return F.interpolate(images, size=16, mode="bilinear", align_corners=False)


def distorted(images: torch.Tensor, copies: int, seed: int) -> torch.Tensor:
    """``copies`` random distortions of each image: affine, dimmer, noisy (fixed by ``seed``)."""
    generator = torch.Generator().manual_seed(seed)
    images = upsampled(images).repeat(copies, 1, 1, 1)
    n = len(images)
    uniform = lambda low, high: low + (high - low) * torch.rand(n, generator=generator)  # noqa: E731
    angle = uniform(-0.6, 0.6)  # radians, about +-35 degrees
    scale = uniform(0.7, 1.2)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = torch.cos(angle) / scale
    theta[:, 0, 1] = -torch.sin(angle) / scale
    theta[:, 1, 0] = torch.sin(angle) / scale
    theta[:, 1, 1] = torch.cos(angle) / scale
    theta[:, :, 2] = torch.stack([uniform(-0.25, 0.25), uniform(-0.25, 0.25)], dim=1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    warped = F.grid_sample(images, grid, align_corners=False)
    contrast = uniform(0.4, 1.0)[:, None, None, None]
    noise = 0.3 * torch.randn(images.shape, generator=generator)
    return (warped * contrast + noise).clamp(-1, 2)


def task_data(task: str) -> tuple[torch.Tensor, ...]:
    train_x, train_y, test_x, test_y = digits.load()
    if task == "digits":
        return upsampled(train_x), train_y, upsampled(test_x), test_y
    return distorted(train_x, 2, 1), train_y.repeat(2), distorted(test_x, 1, 2), test_y


def resnet18() -> nn.Module:
    """torchvision's ResNet-18 with a small-image stem: 3x3 stride 1 on one channel."""
    model = torchvision.models.resnet18(num_classes=10)
    model.conv1 = nn.Conv2d(1, 64, 3, 1, 1, bias=False)
    return model


def vgg() -> nn.Module:
    """A VGG-style plain network: 3x3 conv + BN + ReLU stacks, max-pools, global pool, linear."""
    layers: list[nn.Module] = []
    channels = 1
    for width in (64, "M", 128, "M", 256, 256, "M", 512, 512):
        if width == "M":
            layers.append(nn.MaxPool2d(2))
            continue
        layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)]
        layers.append(nn.ReLU(inplace=True))
        channels = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 10))


ARCHS = {"resnet18": resnet18, "vgg": vgg}


def train_teacher(arch: str, task: str, data: tuple[torch.Tensor, ...], epochs: int) -> nn.Module:
    path = OUT / "teachers" / f"{arch}-{task}-{epochs}.pt"
    torch.manual_seed(0)
    model = ARCHS[arch]()
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    train_x, train_y = data[0], data[1]
    steps = epochs * math.ceil(len(train_x) / 64)
    optimiser = torch.optim.AdamW(model.parameters(), 2e-3, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, 2e-3, total_steps=steps)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(train_x))
        for start in range(0, len(train_x), 64):
            batch = order[start : start + 64]
            optimiser.zero_grad()
            F.cross_entropy(model(train_x[batch]), train_y[batch]).backward()
            optimiser.step()
            schedule.step()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model.eval()


def scores(model: nn.Module, teacher: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    model.eval()
    with torch.no_grad():
        predicted = torch.cat([model(part).argmax(1) for part in x.split(256)])
        wanted = torch.cat([teacher(part).argmax(1) for part in x.split(256)])
    return {
        "accuracy": float((predicted == y).float().mean()),
        "agreement": float((predicted == wanted).float().mean()),
    }


def macs(model: nn.Module) -> int:
    import torch_pruning as tp

    return int(tp.utils.count_ops_and_params(model, torch.zeros(1, 1, 16, 16))[0])


def pruned(teacher: nn.Module, target_macs: int) -> nn.Module:
    """Torch-Pruning, magnitude importance, one global ratio found by bisection at equal MACs."""
    import torch_pruning as tp

    def prune(ratio: float) -> nn.Module:
        model = copy.deepcopy(teacher)
        last = [m for m in model.modules() if isinstance(m, nn.Linear)]
        tp.pruner.MagnitudePruner(
            model,
            torch.zeros(1, 1, 16, 16),
            importance=tp.importance.MagnitudeImportance(p=2),
            pruning_ratio=ratio,
            ignored_layers=last,
        ).step()
        return model

    low, high = 0.0, 0.95
    for _ in range(10):
        middle = (low + high) / 2
        low, high = (middle, high) if macs(prune(middle)) > target_macs else (low, middle)
    return prune(high)


def start(method: str, teacher: nn.Module, ratio: int, calibration: torch.Tensor, steps: int):
    model = copy.deepcopy(teacher)
    if method == "scratch":
        return ghostify.convert(model, ratio=ratio, init="scratch")
    if method == "weights":
        return ghostify.convert(model, ratio=ratio)
    if method.startswith("calibrated"):
        kd = steps if method == "calibrated+kd" else 0
        settings = ghostify.Calibration(calibration, distill_steps=kd, progress=False)
        return ghostify.convert(model, ratio=ratio, calibration_data=settings)
    ghost_macs = macs(ghostify.convert(copy.deepcopy(teacher), ratio=ratio, init="scratch"))
    return pruned(teacher, ghost_macs)


def run_one(arch, task, ratio, method, teacher, data, options) -> dict:
    train_x, _, test_x, test_y = data
    torch.manual_seed(0)
    began, cpu = time.perf_counter(), time.process_time()
    model = start(method, teacher, ratio, train_x[:512], options.distill_steps)
    row = {
        "arch": arch,
        "task": task,
        "ratio": ratio,
        "method": method,
        "macs": macs(model),
        "teacher_macs": macs(teacher),
        "finetune": {"lr": options.lr, "scale_lr": options.scale_lr},
        "seconds": {"convert": time.perf_counter() - began},
        "cpu_seconds": {"convert": time.process_time() - cpu},
        "epochs": {"0": scores(model, teacher, test_x, test_y)},
    }
    done = 0
    for target in options.epochs:
        began, cpu = time.perf_counter(), time.process_time()
        ghostify.finetune(
            model,
            train_x,
            epochs=target - done,
            teacher=teacher,
            lr=options.lr,
            scale_lr=options.scale_lr,
            seed=done,
            progress=False,
        )
        row["seconds"][f"epoch {target}"] = time.perf_counter() - began
        row["cpu_seconds"][f"epoch {target}"] = time.process_time() - cpu
        row["epochs"][str(target)] = scores(model, teacher, test_x, test_y)
        done = target
    return row


def table(rows: list[dict]) -> str:
    lines = []
    for (arch, task), group in _groups(rows):
        teacher = group[0]["teacher"]
        lines += [
            f"\n**{task}, {arch}** (teacher {100 * teacher['accuracy']:.1f}% test accuracy, "
            f"{group[0]['teacher_macs'] / 1e6:.1f} M MACs)\n",
            "| ratio | start | MACs | agreement / accuracy: converted | 1 epoch | 3 epochs "
            "| CPU seconds: convert | 1 epoch | 3 epochs |",
            "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for row in group:
            cells = [
                f"{100 * row['epochs'][e]['agreement']:.1f} / "
                f"{100 * row['epochs'][e]['accuracy']:.1f}"
                if e in row["epochs"]
                else ""
                for e in ("0", "1", "3")
            ]
            # CPU time of this process: the wall time is inflated on a box shared with other jobs
            seconds = row.get("cpu_seconds", row["seconds"])
            times = [f"{seconds[k]:.0f}" if k in seconds else "" for k in ("convert", "epoch 1")]
            times.append(
                f"{seconds['epoch 1'] + seconds['epoch 3']:.0f}" if "epoch 3" in seconds else ""
            )
            settings = row.get("finetune", {"lr": 1e-3, "scale_lr": False})
            method = row["method"] + ("" if settings["scale_lr"] else f" (lr {settings['lr']:g})")
            lines.append(
                f"| {row['ratio']} | {method} | {row['macs'] / 1e6:.1f} M | "
                + " | ".join(cells + times)
                + " |"
            )
    return "\n".join(lines)


def _cell(row: dict, epoch: str) -> str:
    scores = row["epochs"].get(epoch)
    if scores is None:
        return "–"
    return f"{100 * scores['agreement']:.1f} / {100 * scores['accuracy']:.1f}"


def result_tables(rows: list[dict]) -> list[Table]:
    """One table per task and teacher, and the README's headline: digits, data-free against
    calibrated, right after conversion and after one epoch."""
    tables = []
    columns = ["ratio", "start", "MACs (M)", "converted", "1 epoch", "3 epochs"]
    columns += ["CPU s: convert", "1 epoch", "3 epochs"]
    for (arch, task), group in _groups(rows):
        teacher = group[0]["teacher"]
        body = []
        for row in group:
            seconds = row.get("cpu_seconds", row["seconds"])
            three = seconds.get("epoch 1", 0) + seconds["epoch 3"] if "epoch 3" in seconds else None
            body.append(
                [row["ratio"], row["method"], round(row["macs"] / 1e6, 1)]
                + [_cell(row, e) for e in ("0", "1", "3")]
                + [round(seconds["convert"]), _round(seconds.get("epoch 1")), _round(three)]
            )
        tables.append(
            Table(
                f"{task}-{arch}",
                f"{task}, {arch}: teacher {100 * teacher['accuracy']:.1f}% test accuracy, "
                f"{group[0]['teacher_macs'] / 1e6:.1f} M MACs",
                columns,
                body,
                "Agreement with the teacher / test accuracy, % of the test images; CPU seconds "
                "of the benchmark process (one torch thread).",
            )
        )
    headline = [
        [row["arch"], row["ratio"], row["method"], _cell(row, "0"), _cell(row, "1")]
        for (_, task), group in _groups(rows)
        if task == "digits"
        for row in group
        if row["method"] in ("weights", "calibrated")
    ]
    if headline:
        tables.append(
            Table(
                "headline",
                "digits: the data-free fit (weights) against calibration on 512 unlabeled images",
                ["teacher", "ratio", "start", "converted", "after 1 epoch"],
                headline,
                "Agreement with the teacher / test accuracy in %.",
            )
        )
    return tables


def _round(value: float | None) -> int | None:
    return None if value is None else round(value)


def selected(rows: list[dict], options: argparse.Namespace) -> list[dict]:
    """The rows the options would measure (the last of each kind: reruns replace)."""
    keep: dict[tuple, dict] = {}
    for row in rows:
        if (
            row["task"] in options.tasks.split(",")
            and row["arch"] in options.archs.split(",")
            and str(row["ratio"]) in options.ratios.split(",")
            and row["method"] in options.methods.split(",")
        ):
            keep[(row["task"], row["arch"], row["ratio"], row["method"])] = row
    return list(keep.values())


def _groups(rows: list[dict]) -> list[tuple[tuple[str, str], list[dict]]]:
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["arch"], row["task"]), []).append(row)
    order = {m: i for i, m in enumerate(METHODS)}
    return [
        (key, sorted(group, key=lambda r: (r["ratio"], order.get(r["method"], 9))))
        for key, group in groups.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="digits,hard")
    parser.add_argument("--archs", default="resnet18,vgg")
    parser.add_argument("--ratios", default="2,4")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--epochs", default="1,3", help="report after these distillation epochs")
    parser.add_argument("--teacher-epochs", type=int, default=12)
    parser.add_argument("--distill-steps", type=int, default=100, help="for calibrated+kd")
    parser.add_argument("--lr", type=float, default=1e-3, help="finetune's lr, for every start")
    parser.add_argument(
        "--no-scale-lr",
        dest="scale_lr",
        action="store_false",
        help="the full lr for every start (finetune's scale_lr=False)",
    )
    parser.add_argument("--quick", action="store_true", help="digits, resnet18, ratio 2, 1 epoch")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (on a box shared with other jobs, 2 OpenMP threads spin and run "
        "up to 10x slower than 1)",
    )
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--fresh", action="store_true", help="start a new results file")
    options = parser.parse_args()
    if options.quick:
        options.tasks, options.archs, options.ratios, options.epochs = (
            "digits",
            "resnet18",
            "2",
            "1",
        )
    options.epochs = [int(e) for e in options.epochs.split(",")]
    torch.set_num_threads(options.threads)
    OUT.mkdir(parents=True, exist_ok=True)
    if options.fresh and RESULTS.exists():
        RESULTS.unlink()
    if not options.report_only:
        for task in options.tasks.split(","):
            data = task_data(task)
            for arch in options.archs.split(","):
                began = time.perf_counter()
                teacher = train_teacher(arch, task, data, options.teacher_epochs)
                teacher_scores = scores(teacher, teacher, data[2], data[3])
                print(
                    f"{task}/{arch}: teacher {teacher_scores['accuracy']:.4f} "
                    f"({time.perf_counter() - began:.0f} s)",
                    flush=True,
                )
                for ratio in (int(r) for r in options.ratios.split(",")):
                    for method in options.methods.split(","):
                        row = run_one(arch, task, ratio, method, teacher, data, options)
                        row["teacher"] = teacher_scores
                        with RESULTS.open("a") as stream:
                            stream.write(json.dumps(row) + "\n")
                        print(json.dumps(row), flush=True)
    rows = [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]
    rows = selected(rows, options)
    print(table(rows))
    # The command that measures these rows: with --report-only they came from earlier runs of it
    # (or of its pieces, e.g. one per teacher), and rerunning it without the flag measures them.
    command = " ".join(
        ["python benchmarks/knowledge.py", *(a for a in sys.argv[1:] if a != "--report-only")]
    )
    conditions = {"rows": len(rows)}
    print(write_results("knowledge", result_tables(rows), command=command, conditions=conditions))


if __name__ == "__main__":
    main()
