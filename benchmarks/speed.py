"""Original vs converted, each in its best form, side by side in one process.

    python benchmarks/speed.py                       # the README table (takes a while)
    python benchmarks/speed.py --models resnet18 --batches 1 --runtimes eager deploy
    python benchmarks/speed.py --train               # one training step: time and memory
    python benchmarks/speed.py --only-faster         # convert only layers measured faster

For every model (torchvision, weights=None, 224x224) and batch size, each runtime times the
original and the converted model (ratio 2, default conversion) alternately and reports medians
and the ratio original/converted next to the MAC ratio:

- ``eager``: the training form as ``convert`` leaves it (BatchNorms in place, NCHW).
- ``deploy``: both models through ``ghostify.deploy`` (BatchNorms folded, memory layout measured).
- ``compile``: both deployed models through ``torch.compile`` (inductor, frozen weights).
- ``ort``: both deployed models exported to ONNX and run in ONNX Runtime (CPU provider).

``--only-faster`` converts each model per batch size with ``example_inputs`` and
``only_faster=True``: layers whose GhostModule is not faster than the original convolution on
this machine, at that input shape, stay as they were (fewer MACs saved, no slower layer).

``--train`` times one SGD step (forward, backward, update) in train mode at batch 8 and counts
the bytes autograd saves for the backward pass plus parameters and gradients: the memory a
training step needs beyond the inputs, measured exactly rather than from the noisy process RSS.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from torch import nn

import ghostify

RUNTIMES = ("eager", "deploy", "compile", "ort")


def median_pair(first: Callable[[], object], second: Callable[[], object], repeats: int):
    """Medians (seconds) of the two callables, run alternately after a warm-up."""
    for _ in range(2):
        first(), second()
    a, b = [], []
    for _ in range(repeats):
        for fn, out in ((first, a), (second, b)):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return statistics.median(a), statistics.median(b)


def runner(model: nn.Module, x: torch.Tensor, runtime: str, workdir: Path) -> Callable[[], object]:
    """A no-argument callable running ``model`` on ``x`` in ``runtime``."""
    if runtime == "eager":
        model = model.eval()
        return lambda: _infer(model, x)
    deployed = ghostify.deploy(copy.deepcopy(model).eval(), x)
    if runtime == "deploy":
        return lambda: _infer(deployed, x)
    if runtime == "compile":
        torch._inductor.config.freezing = True
        compiled = torch.compile(deployed)
        return lambda: _infer(compiled, x)
    import onnxruntime

    path = workdir / f"{id(model)}.onnx"
    ghostify.export_onnx(deployed.to(memory_format=torch.contiguous_format), x, path)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x.numpy()}
    return lambda: session.run(None, feed)


def _infer(model: nn.Module, x: torch.Tensor) -> object:
    with torch.inference_mode():
        return model(x)


def mac_ratio(original: nn.Module, converted: nn.Module) -> float:
    return ghostify.report(converted, torch.randn(1, 3, 224, 224)).totals["macs_ratio"]


def train_step_cost(model: nn.Module, batch: int, size: int) -> tuple[Callable[[], None], int]:
    """A training-step callable and the bytes it keeps for backward (+ params and grads)."""
    model.train()
    optimiser = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(batch, 3, size, size)
    target = torch.randint(0, 1000, (batch,))

    def step() -> None:
        optimiser.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), target).backward()
        optimiser.step()

    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved[id(tensor)] = tensor.numel() * tensor.element_size()  # each storage once
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = nn.functional.cross_entropy(model(x), target)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    del loss
    return step, sum(saved.values()) + 2 * param_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", nargs="+", default=["resnet50", "resnet18", "mobilenet_v2", "vgg16"]
    )
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--runtimes", nargs="+", choices=RUNTIMES, default=list(RUNTIMES))
    parser.add_argument("--ratio", type=int, default=2)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--train", action="store_true", help="time one training step instead")
    parser.add_argument(
        "--only-faster", action="store_true", help="keep layers whose ghost form is not faster"
    )
    options = parser.parse_args()
    torch.set_num_threads(options.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(options.threads))
    print(
        f"torch {torch.__version__}, {options.threads} threads, {options.size}x{options.size}, "
        f"ratio {options.ratio}, {options.repeats} interleaved repeats, medians"
    )
    # The ONNX files of the runtimes that need one; removed at the end.
    with tempfile.TemporaryDirectory(prefix="ghostify-speed-") as workdir:
        measure_all(options, Path(workdir))


def measure_all(options: argparse.Namespace, workdir: Path) -> None:
    """Print one table row per model, batch and runtime (or training step)."""
    print("| model | batch | runtime | original ms | converted ms | speed-up | MAC ratio |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for name in options.models:
        torch.manual_seed(0)
        original = torchvision.models.get_model(name, weights=None).eval()
        converted = ghostify.convert(copy.deepcopy(original), ratio=options.ratio)
        macs = mac_ratio(original, converted)
        if options.train:
            for batch in options.batches:
                a, a_bytes = train_step_cost(copy.deepcopy(original), batch, options.size)
                b, b_bytes = train_step_cost(copy.deepcopy(converted), batch, options.size)
                ta, tb = median_pair(a, b, max(3, options.repeats // 3))
                print(
                    f"| {name} | {batch} | train step | {ta * 1e3:.0f} | {tb * 1e3:.0f} | "
                    f"x{ta / tb:.2f} | {macs:.2f} | memory {a_bytes / 2**20:.0f} -> "
                    f"{b_bytes / 2**20:.0f} MiB (x{b_bytes / a_bytes:.2f})"
                )
            continue
        for batch in options.batches:
            x = torch.randn(batch, 3, options.size, options.size)
            if options.only_faster:
                converted = ghostify.convert(
                    copy.deepcopy(original),
                    ratio=options.ratio,
                    example_inputs=x,
                    only_faster=True,
                    progress=False,
                )
                macs = mac_ratio(original, converted)
            for runtime in options.runtimes:
                first = runner(original, x, runtime, workdir)
                second = runner(converted, x, runtime, workdir)
                ta, tb = median_pair(first, second, options.repeats)
                print(
                    f"| {name} | {batch} | {runtime} | {ta * 1e3:.1f} | {tb * 1e3:.1f} | "
                    f"x{ta / tb:.2f} | {macs:.2f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
