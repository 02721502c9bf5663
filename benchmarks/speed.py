"""Original vs converted, each in its own best form in the same runtime, side by side.

    python benchmarks/speed.py                      # the CPU tables (takes a while)
    python benchmarks/speed.py --quick              # ResNet-18, 112x112, batch 1: a smoke run
    python benchmarks/speed.py --models resnet50 --batches 8 --runtimes deploy ort
    python benchmarks/speed.py --train              # training steps: time and saved memory
    python benchmarks/speed.py --device cuda        # ResNet-50, batches 1/32/128, fp32 + bf16

Every model (torchvision, weights=None) is converted at ``--ratio`` (every convertible layer).
Each runtime times the original and the converted model alternately (medians of interleaved
runs) and reports the ratio original/converted next to the MAC ratio:

- ``eager``: the training form as ``convert`` leaves it, against the original as it is
  (BatchNorms unfused, NCHW), both in eval mode under ``torch.inference_mode``;
- ``deploy``: the converted model through ``ghostify.deploy`` against the original's own best
  inference form: torch's fx conv-BN fusion in whichever memory layout runs faster (measured);
- ``compile``: both of those through ``torch.compile`` (inductor, frozen weights);
- ``ort``: both of those exported to ONNX and run in ONNX Runtime (CPU provider, all graph
  optimisations) — CPU only.

``--train`` times one SGD step (forward, backward, update) per batch size and counts what the
autograd graph keeps for backward at the end of the forward pass, parameters left out
(``ghostify.testing.memory.graph_saved_bytes``: every storage once, exact, not the noisy RSS);
on CUDA also the peak allocated memory of the step. With ``--dtypes bfloat16`` the step runs under
autocast.

``--device cuda`` (any torch device works) moves both models there; batches default to 1/32/128,
dtypes to float32 and bfloat16 (inference: the models cast; training: autocast), runtimes to eager,
deploy and compile. ``--init`` picks the converted model's weights: ``weights`` (default, the
default conversion: the data-free fit of the random-weight original, each residual stream in one
shared layout, every channel order folded into the readers) or ``scratch`` (PyTorch's
initialisation, identity orders: the same structure without the fit's seconds).
Results go to ``benchmarks/results/<--results>.json`` (default ``speed``, ``speed-cuda`` on a
GPU, ``speed-quick`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from torch import nn

import ghostify
from ghostify.testing.memory import graph_saved_bytes
from ghostify.testing.results import Table, write_results

RUNTIMES = ("eager", "deploy", "compile", "ort")
CUDA_RUNTIMES = ("eager", "deploy", "compile")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (timings of asynchronous devices need it)."""
    if device.type != "cpu":
        module = getattr(torch, device.type, None)
        if module is not None and hasattr(module, "synchronize"):
            module.synchronize()


def median_pair(
    first: Callable[[], object], second: Callable[[], object], repeats: int, device: torch.device
) -> tuple[float, float]:
    """Medians (seconds) of the two callables, run alternately after a warm-up."""
    for _ in range(2):
        first(), second()
    a: list[float] = []
    b: list[float] = []
    for _ in range(repeats):
        for fn, out in ((first, a), (second, b)):
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            out.append(time.perf_counter() - start)
    return statistics.median(a), statistics.median(b)


def _time_once(fn: Callable[[], object], device: torch.device, rounds: int = 3) -> float:
    times = []
    for _ in range(rounds):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def best_original(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """The original's own best inference form: fx conv-BN fusion, the faster memory layout."""
    from torch.fx.experimental.optimization import fuse

    fused = fuse(copy.deepcopy(model).eval())
    if x.dim() != 4:
        return fused
    timings = {}
    for layout in (torch.contiguous_format, torch.channels_last):  # the input as users give it
        fused.to(memory_format=layout)
        _infer(fused, x)  # warm-up
        timings[layout] = _time_once(lambda: _infer(fused, x), x.device)
    return fused.to(memory_format=min(timings, key=timings.get))


def best_converted(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """``ghostify.deploy``: BatchNorms folded, the faster memory layout (measured)."""
    return ghostify.deploy(copy.deepcopy(model).eval(), x)


def runner(
    model: nn.Module,
    x: torch.Tensor,
    runtime: str,
    workdir: Path,
    best: Callable[[nn.Module, torch.Tensor], nn.Module],
    dtype: torch.dtype = torch.float32,
) -> Callable[[], object]:
    """A no-argument callable running ``model`` on ``x`` in ``runtime`` (and ``dtype``)."""
    if runtime == "eager":
        model = copy.deepcopy(model).eval().to(dtype)
        x = x.to(dtype)
        return lambda: _infer(model, x)
    fast = best(model, x).to(dtype)  # fold and pick layouts in float32, then cast
    x = x.to(dtype)
    if runtime == "deploy":
        return lambda: _infer(fast, x)
    if runtime == "compile":
        torch._inductor.config.freezing = True
        compiled = torch.compile(fast)
        return lambda: _infer(compiled, x)
    import onnxruntime

    path = workdir / f"{id(fast)}.onnx"
    ghostify.export_onnx(fast.to(memory_format=torch.contiguous_format), x, path, check=False)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x.numpy()}
    return lambda: session.run(None, feed)


def _infer(model: nn.Module, x: torch.Tensor) -> object:
    with torch.inference_mode():
        return model(x)


def mac_ratio(converted: nn.Module, size: int) -> float:
    probe = copy.deepcopy(converted).cpu().float()
    return ghostify.report(probe, torch.randn(1, 3, size, size)).totals["macs_ratio"]


def train_step(
    model: nn.Module, x: torch.Tensor, dtype: torch.dtype = torch.float32
) -> tuple[Callable[[], None], int]:
    """A training-step callable (SGD) and the bytes its graph keeps for backward."""
    model.train()
    optimiser = torch.optim.SGD(model.parameters(), lr=1e-3)
    target = torch.randint(0, 1000, (x.shape[0],), device=x.device)
    autocast = dtype != torch.float32

    def loss() -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=dtype, enabled=autocast):
            return nn.functional.cross_entropy(model(x), target)

    def step() -> None:
        optimiser.zero_grad(set_to_none=True)
        loss().backward()
        optimiser.step()

    with torch.autocast(x.device.type, dtype=dtype, enabled=autocast):
        output = model(x)
    saved = graph_saved_bytes(output, exclude=list(model.parameters()))
    del output
    return step, saved


def peak_step_bytes(step: Callable[[], None], device: torch.device) -> int | None:
    """Peak memory allocated during one step, where the device counts it (CUDA)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    start = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - start


def _mib(value: int | None) -> float | None:
    return None if value is None else round(value / 2**20, 1)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+")
    parser.add_argument("--batches", nargs="+", type=int)
    parser.add_argument("--runtimes", nargs="+", choices=RUNTIMES)
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--ratio", type=int, default=2)
    parser.add_argument("--init", choices=["scratch", "weights"], default="weights")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch and ORT)")
    parser.add_argument("--train", action="store_true", help="time training steps instead")
    parser.add_argument(
        "--only-faster", action="store_true", help="keep layers whose ghost form is not faster"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="where the time goes in eager deploy (torch.profiler, by kind of work)",
    )
    parser.add_argument("--quick", action="store_true", help="a small smoke run")
    parser.add_argument("--results", help="results file name (default: by device and --quick)")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the results file's other rows (a long sweep run in pieces)",
    )
    options = parser.parse_args(argv)
    cuda = options.device != "cpu"
    if options.quick:
        options.models = options.models or ["resnet18"]
        options.batches = options.batches or [1]
        options.size, options.repeats = min(options.size, 112), min(options.repeats, 5)
    options.models = options.models or (
        ["resnet50"] if cuda else ["resnet50", "resnet18", "mobilenet_v2", "vgg16"]
    )
    options.batches = options.batches or ([1, 32, 128] if cuda else [1, 8])
    options.runtimes = options.runtimes or list(CUDA_RUNTIMES if cuda else RUNTIMES)
    options.dtypes = options.dtypes or (["float32", "bfloat16"] if cuda else ["float32"])
    if cuda and "ort" in options.runtimes:
        parser.error("--runtimes ort runs on the CPU only")
    options.results = options.results or (
        "speed-quick" if options.quick else "speed-cuda" if cuda else "speed"
    )
    return options


def main(argv: list[str] | None = None) -> None:
    options = parse(argv)
    torch.set_num_threads(options.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(options.threads))
    device = torch.device(options.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"torch {torch.__version__}, {name}, {options.threads} threads, {options.size}x"
        f"{options.size}, ratio {options.ratio}, init {options.init}, {options.repeats} "
        "interleaved repeats, medians"
    )
    with tempfile.TemporaryDirectory(prefix="ghostify-speed-") as workdir:
        if options.train:
            tables = [measure_training(options, device)]
        elif options.profile:
            tables = [measure_profile(options, device)]
        else:
            tables = [measure_inference(options, device, Path(workdir))]
    command = "python benchmarks/speed.py " + " ".join(sys.argv[1:] if argv is None else argv)
    conditions = {
        "device": name,
        "ratio": options.ratio,
        "init": options.init,
        "size": options.size,
        "repeats": options.repeats,
    }
    if options.merge:
        command += " (merged with earlier pieces)"
    path = write_results(
        options.results, tables, command=command, conditions=conditions, merge=options.merge
    )
    print(f"wrote {path}")


def _models(options: argparse.Namespace, name: str) -> tuple[nn.Module, nn.Module, float]:
    torch.manual_seed(0)
    original = torchvision.models.get_model(name, weights=None).eval()
    converted = ghostify.convert(
        copy.deepcopy(original), ratio=options.ratio, init=options.init, progress=False
    )
    return original, converted, mac_ratio(converted, options.size)


def measure_inference(options: argparse.Namespace, device: torch.device, workdir: Path) -> Table:
    """One row per model, batch, dtype and runtime."""
    columns = ["model", "batch", "dtype", "runtime", "original ms", "converted ms", "speed-up"]
    columns.append("MAC ratio")
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    rows = []
    for name in options.models:
        original, converted, macs = _models(options, name)
        original, converted = original.to(device), converted.to(device)
        for batch in options.batches:
            x = torch.randn(batch, 3, options.size, options.size, device=device)
            if options.only_faster:
                converted = ghostify.convert(
                    copy.deepcopy(original),
                    ratio=options.ratio,
                    init=options.init,
                    example_inputs=x,
                    only_faster=True,
                    progress=False,
                )
                macs = mac_ratio(converted, options.size)
            for dtype_name in options.dtypes:
                dtype = DTYPES[dtype_name]
                for runtime in options.runtimes:
                    if runtime == "ort" and dtype != torch.float32:
                        continue
                    first = runner(original, x, runtime, workdir, best_original, dtype)
                    second = runner(converted, x, runtime, workdir, best_converted, dtype)
                    ta, tb = median_pair(first, second, options.repeats, device)
                    row = [name, batch, dtype_name, runtime, ta * 1e3, tb * 1e3, ta / tb, macs]
                    rows.append(row)
                    print(
                        f"| {name} | {batch} | {dtype_name} | {runtime} | {ta * 1e3:.1f} | "
                        f"{tb * 1e3:.1f} | x{ta / tb:.2f} | {macs:.2f} |",
                        flush=True,
                    )
    return Table(
        "inference",
        "Inference: original vs converted, each in its best form in the same runtime",
        columns,
        rows,
        notes="speed-up: original ms / converted ms (medians of interleaved runs).",
    )


def measure_profile(options: argparse.Namespace, device: torch.device) -> Table:
    """Per model and batch: ms per call of each kind of work, original vs converted, deployed."""
    from ghostify.testing.profile import KINDS, time_by_kind

    columns = ["model", "batch", "form", *[f"{kind} ms" for kind in KINDS], "total ms"]
    rows = []
    for name in options.models:
        original, converted, _ = _models(options, name)
        for batch in options.batches:
            x = torch.randn(batch, 3, options.size, options.size, device=device)
            for label, model, best in (
                ("original", original, best_original),
                ("converted", converted, best_converted),
            ):
                fast = best(model.to(device), x)
                ms = time_by_kind(lambda: _infer(fast, x), repeats=options.repeats)  # noqa: B023
                rows.append([name, batch, label, *ms.values(), sum(ms.values())])
                print(
                    f"| {name} | {batch} | {label} | " + " | ".join(f"{v:.1f}" for v in ms.values())
                )
    return Table(
        "profile",
        "Where the deployed models' time goes (torch.profiler, operators' own CPU time per call)",
        columns,
        rows,
        notes=(
            "Both models in their best inference form; dense conv: every convolution but the "
            "depthwise ones (a GhostModule's primary, and the layers kept); depthwise conv: "
            "the cheap ops; copies: concatenations and copies; elementwise: bias, residual add, "
            "activations; other: pooling, the classifier, allocation, dispatch."
        ),
    )


def measure_training(options: argparse.Namespace, device: torch.device) -> Table:
    """One row per model, batch and dtype: step time, kept-for-backward bytes, peak bytes."""
    columns = ["model", "batch", "dtype", "original ms", "converted ms", "speed-up"]
    columns += ["original saved MiB", "converted saved MiB", "saved ratio"]
    columns += ["original peak MiB", "converted peak MiB"]
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    rows = []
    for name in options.models:
        original, converted, _ = _models(options, name)
        for batch in options.batches:
            x = torch.randn(batch, 3, options.size, options.size, device=device)
            for dtype_name in options.dtypes:
                dtype = DTYPES[dtype_name]
                first_model = copy.deepcopy(original).to(device)
                second_model = copy.deepcopy(converted).to(device)
                first, first_saved = train_step(first_model, x, dtype)
                second, second_saved = train_step(second_model, x, dtype)
                repeats = max(3, options.repeats // 3)
                ta, tb = median_pair(first, second, repeats, device)
                peaks = [peak_step_bytes(step, device) for step in (first, second)]
                row = [name, batch, dtype_name, ta * 1e3, tb * 1e3, ta / tb]
                row += [_mib(first_saved), _mib(second_saved), second_saved / first_saved]
                row += [_mib(peak) for peak in peaks]
                rows.append(row)
                print(
                    f"| {name} | {batch} | {dtype_name} | {ta * 1e3:.0f} | {tb * 1e3:.0f} | "
                    f"x{ta / tb:.2f} | {_mib(first_saved)} | {_mib(second_saved)} | "
                    f"x{second_saved / first_saved:.2f} | {_mib(peaks[0])} | {_mib(peaks[1])} |",
                    flush=True,
                )
                del first_model, second_model, first, second
    return Table(
        "train-step",
        "One training step (SGD): time, and what the graph keeps for backward",
        columns,
        rows,
        notes=(
            "saved: bytes the autograd graph holds at the end of the forward pass, parameters "
            "left out, each storage once; peak: allocated during the step (CUDA only)."
        ),
    )


if __name__ == "__main__":
    main()
