"""How long a conversion takes, in forward passes of the same model, measured in one process.

    python benchmarks/conversion_time.py [--models resnet50,resnet18] [--repeats 5] [--threads 2]
    python benchmarks/conversion_time.py --quick     # resnet18, 2 repeats: a smoke run

For each model: one forward pass (eval, batch 1, 224x224), the default conversion (data-free fit,
no inputs), the same with ``example_inputs`` (adds the shape checks and the check forward pass),
and rebuilding from a plan (``convert(fresh, plan=plan)``, what reloading a checkpoint does).
The runs alternate, so drift in the machine's load hits all of them alike, and the medians are
compared: ``ratio`` is conversion time / forward time. Building the torchvision model itself is
not timed. Writes benchmarks/results/conversion_time.json. Time it on an idle machine: the
ratios move with the machine's load.
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import time
from collections.abc import Callable

import torch
import torchvision

import ghostify
from ghostify.testing.results import Table, write_results

# No progress bars in a timing (and older ghostify versions, for a before/after, have none).
QUIET = {"progress": False} if "progress" in inspect.signature(ghostify.convert).parameters else {}


def timed(work: Callable[[], object]) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def measure(name: str, repeats: int) -> dict[str, list[float]]:
    """Seconds per run of each step, runs interleaved."""
    build = getattr(torchvision.models, name)
    reference = build().eval()
    x = torch.randn(1, 3, 224, 224)
    plan = ghostify.plan_of(ghostify.convert(build()))
    times: dict[str, list[float]] = {"forward": [], "default": [], "inputs": [], "plan": []}
    with torch.no_grad():
        reference(x)  # warm-up: first calls allocate and pick kernels
    for _ in range(repeats):
        models = [build() for _ in range(3)]
        with torch.no_grad():
            times["forward"].append(timed(lambda: reference(x)))
        times["default"].append(timed(lambda m=models[0]: ghostify.convert(m, **QUIET)))
        times["inputs"].append(
            timed(lambda m=models[1]: ghostify.convert(m, example_inputs=x, **QUIET))
        )
        times["plan"].append(timed(lambda m=models[2]: ghostify.convert(m, plan=plan, **QUIET)))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet50,resnet18")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="resnet18, 2 repeats")
    options = parser.parse_args()
    if options.quick:
        options.models, options.repeats = "resnet18", 2
    torch.set_num_threads(options.threads)
    print(f"torch threads: {torch.get_num_threads()}, repeats: {options.repeats} (medians)")
    print(f"{'model':10s} {'step':8s} {'seconds':>8s} {'ratio':>7s}")
    rows = []
    for name in options.models.split(","):
        times = measure(name, options.repeats)
        forward = statistics.median(times["forward"])
        medians = {step: statistics.median(runs) for step, runs in times.items()}
        for step, seconds in medians.items():
            print(f"{name:10s} {step:8s} {seconds:8.3f} {seconds / forward:7.2f}")
        rows.append(
            [name, options.threads, f"{forward:.3f} s"]
            + [f"{medians[s]:.2f} s ({medians[s] / forward:.1f})" for s in ("default", "inputs")]
            + [f"{medians['plan']:.2f} s ({medians['plan'] / forward:.1f})"]
        )
    table = Table(
        "resnet",
        "Conversion time, in forward passes of the same model (in brackets)",
        [
            *("model", "torch threads", "forward pass (batch 1, 224 px)"),
            *("default conversion", "with example_inputs", "rebuild from a plan"),
        ],
        rows,
        f"Medians of {options.repeats} interleaved runs in one process.",
    )
    print(write_results("conversion_time", [table]))


if __name__ == "__main__":
    main()
