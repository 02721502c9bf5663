"""Wall-clock latency of a converted model against its original, side by side in one process.

    python benchmarks/speed.py [--model resnet50] [--ratio 2] [--size 224] [--batch 1]
                               [--repeats 20] [--device cpu|cuda]

Fewer MACs do not always mean faster: the ghost path adds a depthwise conv, a channel gather and a
concatenation, which are memory-bound. This prints the measured ratio so nobody has to guess.
Runs alternate between the two models so that drift in machine load hits both alike.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torchvision

import ghostify


def timed(model: torch.nn.Module, x: torch.Tensor, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.inference_mode():
        model(x)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--ratio", type=int, default=2)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    options = parser.parse_args()

    original = torchvision.models.get_model(options.model, weights=None).eval().to(options.device)
    converted = ghostify.convert(copy.deepcopy(original), ratio=options.ratio)
    x = torch.randn(options.batch, 3, options.size, options.size, device=options.device)
    for model in (original, converted):  # warm-up: allocator, kernels, caches
        for _ in range(3):
            timed(model, x, options.device)
    base, ghost = [], []
    for _ in range(options.repeats):
        base.append(timed(original, x, options.device))
        ghost.append(timed(converted, x, options.device))
    b, g = statistics.median(base), statistics.median(ghost)
    print(
        f"{options.model} ratio={options.ratio} input={tuple(x.shape)} device={options.device} "
        f"threads={torch.get_num_threads()}"
    )
    print(f"original  median {b * 1e3:8.2f} ms")
    print(f"converted median {g * 1e3:8.2f} ms")
    print(f"speed-up (original / converted): {b / g:.2f}x")


if __name__ == "__main__":
    main()
