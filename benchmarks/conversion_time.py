"""How long a conversion takes, in forward passes of the same model, measured in one process.

    python benchmarks/conversion_time.py [--models resnet50,resnet18] [--repeats 5] [--threads 2]

For each model: one forward pass (eval, batch 1, 224x224), the default conversion (data-free fit,
no inputs), the same with ``example_inputs`` (adds the shape checks and the check forward pass),
and rebuilding from a plan (``convert(fresh, plan=plan)``, what reloading a checkpoint does).
The runs alternate, so drift in the machine's load hits all of them alike, and the medians are
compared: ``ratio`` is conversion time / forward time. Building the torchvision model itself is
not timed.
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
    options = parser.parse_args()
    torch.set_num_threads(options.threads)
    print(f"torch threads: {torch.get_num_threads()}, repeats: {options.repeats} (medians)")
    print(f"{'model':10s} {'step':8s} {'seconds':>8s} {'ratio':>7s}")
    for name in options.models.split(","):
        times = measure(name, options.repeats)
        forward = statistics.median(times["forward"])
        for step, runs in times.items():
            seconds = statistics.median(runs)
            print(f"{name:10s} {step:8s} {seconds:8.3f} {seconds / forward:7.2f}")


if __name__ == "__main__":
    main()
