"""Budgets: is the outcome asked for the outcome measured, and what does choosing per layer buy?

    python benchmarks/budget.py --quick              # ResNet-18 smoke run of every section
    python benchmarks/budget.py --sections speed --models resnet50 --batches 8
    python benchmarks/budget.py --report-only        # the tables of the rows gathered so far

Sections (``--sections``, default all; each appends its rows to benchmarks/out/budget.jsonl as
they come, so a long sweep can be run in pieces; ``--fresh`` starts over):

- ``speed``: ``convert(model, budget=Budget(speedup=t), example_inputs=x)`` for each model,
  target and batch (random weights, data-free: speed does not depend on the weights). The plan's
  own verdict is the "converted model" measurement the conversion ends with; then, independently,
  the converted model and the original are each deployed again and timed interleaved
  (``--rounds`` rounds, the least disturbed sample each): "measured after". A target the solver
  refuses is recorded with the best speed-up it measured.
- ``macs``: ``Budget(macs=f)``: the MAC fraction ``ghostify.report`` counts afterwards.
- ``knowledge``: the knowledge benchmark's tasks and teachers (``benchmarks/knowledge.py``) at
  equal MACs: the budget's per-layer choice vs the uniform ratio 2 vs Torch-Pruning's magnitude
  pruning, all calibrated on 512 unlabeled training images (pruning: none), agreement with the
  teacher right after and after 1 and 3 epochs of distillation.
- ``proxies``: which sensitivity proxy ranks the forms best: for one form per layer and ratio,
  only that layer converted (calibrated), the model's relative logit error against the
  layer's calibrated loss times each proxy's weight (Spearman rank correlation), and the
  agreement of a whole budgeted conversion with each proxy.
- ``cost``: ResNet-50, a budgeted calibrated conversion with a warm timing cache against a plain
  calibrated one (ratio 2), same data, same process.

Timings taken on a machine shared with other jobs are provisional. Results:
benchmarks/results/budget.json (``--quick``: budget-quick.json).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torchvision
from scipy.stats import spearmanr
from torch import nn

import ghostify
from ghostify.budget.latency import time_models
from ghostify.testing.results import Table, write_results

sys.path.insert(0, str(Path(__file__).resolve().parent))
import knowledge  # the knowledge benchmark's tasks, teachers and baselines

OUT = Path(__file__).resolve().parent / "out"
SECTIONS = ("speed", "macs", "knowledge", "proxies", "cost")


def record(options: argparse.Namespace, row: dict) -> None:
    with options.rows.open("a") as stream:
        stream.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


def zoo(name: str) -> nn.Module:
    return getattr(torchvision.models, name)().eval()


def measure_after(
    converted: nn.Module, original: nn.Module, args: tuple, runtime: str, rounds: int
) -> float:
    """The original's time over the converted model's, each deployed afresh, timed interleaved."""
    deployed = [ghostify.deploy(copy.deepcopy(m).eval(), args) for m in (original, converted)]
    original_ms, converted_ms = time_models(deployed, args, runtime, rounds=rounds)
    return original_ms / converted_ms


def run_speed(options: argparse.Namespace) -> None:
    for name in options.models:
        original = zoo(name)
        for batch in options.batches:
            x = torch.randn(batch, 3, options.size, options.size)
            for runtime in options.runtimes:
                for target in options.targets:
                    model = copy.deepcopy(original)
                    row = {"section": "speed", "model": name, "batch": batch, "size": options.size}
                    row.update(runtime=runtime, target=target)
                    began = time.perf_counter()
                    budget = ghostify.Budget(speedup=target, runtime=runtime)
                    try:
                        ghostify.convert(model, budget=budget, example_inputs=x, progress=False)
                    except ghostify.ConfigError as error:
                        row.update(
                            status="refused", reason=str(error), seconds=time.perf_counter() - began
                        )
                        record(options, row)
                        continue
                    plan = ghostify.budget_plan(model)
                    row["seconds"] = time.perf_counter() - began
                    after = measure_after(model, original, (x,), runtime, options.rounds)
                    row.update(
                        status="met" if after >= target else "missed",
                        predicted=plan.predicted_speedup,
                        measured=plan.measured_speedup,
                        measured_after=after,
                        rounds=[m.to_dict() for m in plan.measurements],
                        macs_fraction=plan.totals["macs_after"] / plan.totals["macs_before"],
                        converted=len(plan.settings()),
                        layers=len(plan.layers),
                        timing=plan.timing,
                        stages=plan.seconds,
                    )
                    record(options, row)


def run_macs(options: argparse.Namespace) -> None:
    for name in options.models:
        x = torch.randn(1, 3, options.size, options.size)
        for fraction in options.fractions:
            model = zoo(name)
            began = time.perf_counter()
            row = {"section": "macs", "model": name, "fraction": fraction}
            try:
                ghostify.convert(model, budget=ghostify.Budget(macs=fraction), example_inputs=x)
            except ghostify.ConfigError as error:
                row.update(status="refused", reason=str(error))
                record(options, row)
                continue
            totals = ghostify.report(model, x).totals
            plan = ghostify.budget_plan(model)
            row.update(
                status="met"
                if totals["macs_after"] <= fraction * totals["macs_before"]
                else "missed",
                macs_fraction=totals["macs_after"] / totals["macs_before"],
                predicted_fraction=plan.totals["macs_after"] / plan.totals["macs_before"],
                params_fraction=totals["params_after"] / totals["params_before"],
                converted=len(plan.settings()),
                layers=len(plan.layers),
                forms=sorted(
                    {
                        layer.choices[p].label
                        for layer, p in zip(plan.layers, plan.picks, strict=True)
                    }
                ),
                seconds=time.perf_counter() - began,
            )
            record(options, row)


def fvcore_fraction(model: nn.Module, teacher: nn.Module, x: torch.Tensor) -> float:
    del teacher
    totals = ghostify.report(model, x).totals
    return totals["macs_after"] / totals["macs_before"]


def teachers(options: argparse.Namespace) -> Iterator[tuple[str, str, nn.Module, tuple]]:
    """(task, arch, teacher, data) for each of the knowledge benchmark's tasks and teachers."""
    for task in options.tasks:
        data = knowledge.task_data(task)
        for arch in options.archs:
            yield task, arch, knowledge.train_teacher(arch, task, data, 12), data


def run_knowledge(options: argparse.Namespace) -> None:
    for task, arch, teacher, data in teachers(options):
        train_x, _, test_x, test_y = data
        calibration, x = train_x[:512], train_x[:1]
        uniform = ghostify.convert(
            copy.deepcopy(teacher), ratio=2, calibration_data=calibration, progress=False
        )
        fraction = fvcore_fraction(uniform, teacher, x)
        budgeted = ghostify.convert(
            copy.deepcopy(teacher),
            budget=ghostify.Budget(macs=fraction),
            example_inputs=x,
            calibration_data=calibration,
            progress=False,
        )
        pruned = knowledge.pruned(teacher, knowledge.macs(budgeted))
        for method, model in (
            ("budget", budgeted),
            ("uniform ratio 2", uniform),
            ("pruning", pruned),
        ):
            row = {"section": "knowledge", "task": task, "arch": arch, "method": method}
            row.update(macs=knowledge.macs(model), teacher_macs=knowledge.macs(teacher))
            row["epochs"] = {"0": knowledge.scores(model, teacher, test_x, test_y)}
            done = 0
            for epoch in options.epochs:
                ghostify.finetune(
                    model,
                    train_x,
                    epochs=epoch - done,
                    teacher=teacher,
                    seed=done,
                    progress=False,
                )
                row["epochs"][str(epoch)] = knowledge.scores(model, teacher, test_x, test_y)
                done = epoch
            record(options, row)


def logit_error(model: nn.Module, teacher: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        want, got = teacher(x), model(x)
    return float((got - want).square().sum() / want.square().sum())


def run_proxies(options: argparse.Namespace) -> None:
    from ghostify.budget.planner import plan_budget

    for task, arch, teacher, data in teachers(options):
        train_x, _, test_x, test_y = data
        calibration, x = train_x[:512], train_x[:64]
        plans = {
            proxy: plan_budget(
                teacher,
                ghostify.Budget(macs=1.0, sensitivity=proxy),
                x,
                calibration_data=calibration,
            )
            for proxy in ("none", "batchnorm", "probe")
        }
        truth, predicted = [], {proxy: [] for proxy in plans}
        for index, layer in enumerate(plans["none"].layers):
            for position, choice in enumerate(layer.choices):
                if choice.keep or (choice.ratio, choice.dw_size) not in options.forms:
                    continue
                model = ghostify.convert(
                    copy.deepcopy(teacher),
                    include=[layer.name],
                    skip_stem=False,
                    ratio=choice.ratio,
                    dw_size=choice.dw_size,
                    calibration_data=calibration,
                    progress=False,
                )
                truth.append(logit_error(model, teacher, test_x[:512]))
                for proxy, plan in plans.items():
                    predicted[proxy].append(plan.layers[index].loss[position])
        row = {"section": "proxies", "task": task, "arch": arch, "pairs": len(truth)}
        row["spearman"] = {
            proxy: float(spearmanr(values, truth).statistic) for proxy, values in predicted.items()
        }
        row["agreement"] = {}
        fraction = options.proxy_fraction
        for proxy in plans:
            model = ghostify.convert(
                copy.deepcopy(teacher),
                budget=ghostify.Budget(macs=fraction, sensitivity=proxy),
                example_inputs=x,
                calibration_data=calibration,
                progress=False,
            )
            row["agreement"][proxy] = knowledge.scores(model, teacher, test_x, test_y)["agreement"]
        row["macs_fraction"] = fraction
        record(options, row)


def run_cost(options: argparse.Namespace) -> None:
    original = zoo("resnet50")
    data = torch.randn(options.images, 3, 224, 224)
    x = data[: options.cost_batch]
    budget = ghostify.Budget(speedup=1.2)
    ghostify.convert(
        copy.deepcopy(original), budget=budget, example_inputs=x, progress=False
    )  # warms the cache
    times = {}
    for label, arguments in (
        ("plain calibrated (ratio 2)", {"ratio": 2}),
        ("budgeted calibrated, warm cache", {"budget": budget}),
    ):
        began = time.perf_counter()
        ghostify.convert(
            copy.deepcopy(original),
            example_inputs=x,
            calibration_data=data,
            progress=False,
            **arguments,
        )
        times[label] = time.perf_counter() - began
    row = {"section": "cost", "model": "resnet50", "images": options.images, "seconds": times}
    row["ratio"] = times["budgeted calibrated, warm cache"] / times["plain calibrated (ratio 2)"]
    record(options, row)


def tables(rows: list[dict]) -> list[Table]:
    out = []
    speed = [r for r in rows if r["section"] == "speed"]
    if speed:
        out.append(
            Table(
                "speed",
                "Speed-up budgets: measured after conversion, against the original's deployed form",
                [
                    "model",
                    "input",
                    "runtime",
                    "target",
                    "result",
                    "measured after",
                    "plan measured",
                    "predicted",
                    "MACs kept",
                    "layers converted",
                    "seconds",
                ],
                [
                    [
                        r["model"],
                        f"{r['batch']}x3x{r['size']}x{r['size']}",
                        r["runtime"],
                        f"x{r['target']}",
                        r["status"],
                        f"x{r['measured_after']:.3f}" if "measured_after" in r else "",
                        f"x{r['measured']:.3f}" if r.get("measured") else "",
                        f"x{r['predicted']:.3f}" if r.get("predicted") else "",
                        f"{r['macs_fraction']:.3f}" if "macs_fraction" in r else "",
                        f"{r['converted']}/{r['layers']}" if "converted" in r else "",
                        f"{r['seconds']:.0f}",
                    ]
                    for r in speed
                ],
                "refused: the solver's error names the best speed-up measured",
            )
        )
    macs = [r for r in rows if r["section"] == "macs"]
    if macs:
        out.append(
            Table(
                "macs",
                "MAC budgets: the fraction ghostify.report counts afterwards",
                [
                    "model",
                    "budget",
                    "result",
                    "MACs kept",
                    "predicted",
                    "params kept",
                    "layers converted",
                    "forms",
                ],
                [
                    [
                        r["model"],
                        r["fraction"],
                        r["status"],
                        f"{r.get('macs_fraction', 0):.4f}",
                        f"{r.get('predicted_fraction', 0):.4f}",
                        f"{r.get('params_fraction', 0):.4f}",
                        f"{r.get('converted', '')}/{r.get('layers', '')}",
                        ", ".join(r.get("forms", [])),
                    ]
                    for r in macs
                ],
            )
        )
    known = [r for r in rows if r["section"] == "knowledge"]
    if known:
        epochs = sorted({int(e) for r in known for e in r["epochs"]})
        out.append(
            Table(
                "knowledge",
                "Equal MACs: agreement with the teacher (test set): budget, uniform ratio, pruning",
                [
                    "task",
                    "teacher",
                    "method",
                    "MACs kept",
                    *[f"agreement, {e} epochs" for e in epochs],
                ],
                [
                    [
                        r["task"],
                        r["arch"],
                        r["method"],
                        f"{r['macs'] / r['teacher_macs']:.3f}",
                        *[
                            f"{100 * r['epochs'][str(e)]['agreement']:.1f}%"
                            if str(e) in r["epochs"]
                            else ""
                            for e in epochs
                        ],
                    ]
                    for r in known
                ],
            )
        )
    proxies = [r for r in rows if r["section"] == "proxies"]
    if proxies:
        names = list(proxies[0]["spearman"])
        out.append(
            Table(
                "proxies",
                "Sensitivity proxies: rank correlation with the true logit error, and agreement",
                [
                    "task",
                    "teacher",
                    "pairs",
                    *[f"Spearman {p}" for p in names],
                    "MACs kept",
                    *[f"agreement {p}" for p in names],
                ],
                [
                    [
                        r["task"],
                        r["arch"],
                        r["pairs"],
                        *[f"{r['spearman'][p]:.3f}" for p in names],
                        r["macs_fraction"],
                        *[f"{100 * r['agreement'][p]:.1f}%" for p in names],
                    ]
                    for r in proxies
                ],
            )
        )
    cost = [r for r in rows if r["section"] == "cost"]
    if cost:
        out.append(
            Table(
                "cost",
                "ResNet-50: budgeted calibrated conversion (warm cache) vs plain calibrated",
                ["images", "plain calibrated s", "budgeted s", "ratio"],
                [
                    [
                        r["images"],
                        f"{r['seconds']['plain calibrated (ratio 2)']:.0f}",
                        f"{r['seconds']['budgeted calibrated, warm cache']:.0f}",
                        f"{r['ratio']:.2f}",
                    ]
                    for r in cost
                ],
            )
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default=None, help=f"of {','.join(SECTIONS)} (default all)")
    parser.add_argument("--models", default="resnet50,resnet18,mobilenet_v2,vgg16")
    parser.add_argument("--targets", default="1.2,1.4,1.6")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--runtimes", default="eager")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=15, help="rounds of the after-measurement")
    parser.add_argument("--fractions", default="0.5,0.35")
    parser.add_argument("--tasks", default="digits,hard")
    parser.add_argument("--archs", default="resnet18,vgg")
    parser.add_argument("--epochs", default="1,3")
    parser.add_argument("--forms", default="2x3,4x1", help="proxies: ratio x dw_size per layer")
    parser.add_argument("--proxy-fraction", type=float, default=0.5)
    parser.add_argument("--images", type=int, default=64, help="cost: calibration images")
    parser.add_argument("--cost-batch", type=int, default=8)
    parser.add_argument(
        "--train-threads",
        type=int,
        default=1,
        help="torch threads for the knowledge and proxies sections (training on a shared box: "
        "2 OpenMP threads spin; see benchmarks/knowledge.py); timed sections use torch's own",
    )
    parser.add_argument("--quick", action="store_true", help="ResNet-18 and digits, small")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--fresh", action="store_true", help="start a new rows file")
    options = parser.parse_args()
    name = "budget-quick" if options.quick else "budget"
    if options.quick:
        options.models, options.targets, options.batches, options.size = "resnet18", "1.2", "1", 112
        options.fractions, options.tasks, options.archs, options.epochs = (
            "0.5",
            "digits",
            "resnet18",
            "1",
        )
        options.forms, options.images, options.rounds = "2x3", 8, 9
        options.sections = options.sections or "speed,macs,knowledge,proxies"
    options.sections = options.sections or ",".join(SECTIONS)
    options.models = options.models.split(",")
    options.targets = [float(t) for t in options.targets.split(",")]
    options.batches = [int(b) for b in options.batches.split(",")]
    options.runtimes = options.runtimes.split(",")
    options.fractions = [float(f) for f in options.fractions.split(",")]
    options.tasks, options.archs = options.tasks.split(","), options.archs.split(",")
    options.epochs = [int(e) for e in options.epochs.split(",")]
    options.forms = {tuple(int(v) for v in form.split("x")) for form in options.forms.split(",")}
    options.rows = OUT / f"{name}.jsonl"
    OUT.mkdir(parents=True, exist_ok=True)
    if options.fresh and options.rows.exists():
        options.rows.unlink()
    if not options.report_only:
        runners = {
            "speed": run_speed,
            "macs": run_macs,
            "knowledge": run_knowledge,
            "proxies": run_proxies,
            "cost": run_cost,
        }
        threads = torch.get_num_threads()
        for section in options.sections.split(","):
            training = section in ("knowledge", "proxies")
            torch.set_num_threads(options.train_threads if training else threads)
            runners[section](options)
        torch.set_num_threads(threads)
    rows = [json.loads(line) for line in options.rows.read_text().splitlines() if line.strip()]
    result = tables(rows)
    for table in result:
        print(
            f"\n{table.title}\n"
            + "\n".join(" | ".join(map(str, row)) for row in [table.columns, *table.rows])
        )
    command = "python benchmarks/budget.py " + " ".join(sys.argv[1:])
    print("wrote", write_results(name, result, command=command))


if __name__ == "__main__":
    main()
