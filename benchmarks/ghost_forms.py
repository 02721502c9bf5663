"""Forms of a deployed GhostModule, timed per ResNet-50 layer shape in each runtime.

    python benchmarks/ghost_forms.py                     # eager (both layouts) and ONNX Runtime
    python benchmarks/ghost_forms.py --quick             # three layer shapes, batch 1
    python benchmarks/ghost_forms.py --runtimes compile  # torch.compile (inductor) of each form

A deployed GhostModule (BatchNorm folded, identity channel order: the layout one shared stream
order gives) computes ``cat(primary(x) + b_i, cheap(primary(x)) + b_g)``. The cheap op must
read the primary output *without* its bias (its zero padding would not see it), which is why
the intrinsic half's bias ``b_i`` is a separate pass. Forms, each an ``nn.Module``:

- ``conv``: the original convolution with its BatchNorm folded (the baseline, x1.00);
- ``cat``: what ``ghostify.deploy`` runs: ``cat([p + b_i, cheap(p) + b_g])``;
- ``cat-bias``: ``cat([p, cheap(p)]) + b`` (one per-channel add after the concatenation: one
  pattern ONNX Runtime's optimiser and inductor fuse);
- ``cat-inplace``: ``out = cat([p, cheap(p) + b_g]); out[:, :m] += b_i`` (in place, half a pass);
- ``into-buffer``: both halves written by ``torch.cat(out=)`` into a preallocated buffer;
- ``multiplier``: no concatenation: one depthwise conv with a channel multiplier writes every
  output (a centre tap of 1 copies each intrinsic channel, with its bias; the other slots are its
  ghosts). Its output order interleaves the halves, so a model using it must permute its readers.

Eager and ONNX Runtime timings come from ``ghostify.timing`` (interleaved, medians, no disk
cache); compile times each form after ``torch.compile``. Each row: the conv's ms, then each form's
speed-up over it. Results: ``benchmarks/results/ghost_forms.json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from torch import nn

from ghostify.testing.results import Table, write_results
from ghostify.timing import TimingDatabase

SHAPES = [  # (in, out, kernel, stride, spatial) of ResNet-50 layers, 224x224 input
    (64, 64, 1, 1, 56),
    (64, 64, 3, 1, 56),
    (64, 256, 1, 1, 56),
    (256, 64, 1, 1, 56),
    (256, 128, 1, 1, 56),
    (128, 128, 3, 2, 56),
    (128, 512, 1, 1, 28),
    (256, 512, 1, 2, 56),
    (512, 128, 1, 1, 28),
    (128, 128, 3, 1, 28),
    (1024, 256, 1, 1, 14),
    (256, 256, 3, 1, 14),
    (256, 1024, 1, 1, 14),
    (2048, 512, 1, 1, 7),
    (512, 512, 3, 1, 7),
    (512, 2048, 1, 1, 7),
]
QUICK_SHAPES = [SHAPES[2], SHAPES[9], SHAPES[15]]
FORMS = ("cat", "cat-bias", "cat-inplace", "into-buffer", "multiplier")


class DeployedGhost(nn.Module):
    """A deployed GhostModule (ratio 2, 3x3 cheap op) in one of ``FORMS``; random weights."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, form: str) -> None:
        super().__init__()
        m = cout // 2
        self.form, self.m = form, m
        self.primary = nn.Conv2d(cin, m, kernel, stride, kernel // 2, bias=False)
        if form == "multiplier":
            self.cheap = nn.Conv2d(m, 2 * m, 3, 1, 1, groups=m, bias=True)
            with torch.no_grad():  # even slots copy their intrinsic channel
                self.cheap.weight[0::2].zero_()
                self.cheap.weight[0::2, :, 1, 1] = 1.0
            return
        self.cheap = nn.Conv2d(m, m, 3, 1, 1, groups=m, bias=form != "cat-bias")
        self.intrinsic_bias = nn.Parameter(torch.randn(m))
        self.bias = nn.Parameter(torch.randn(2 * m))  # cat-bias: both halves' shifts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.primary(x)
        if self.form == "multiplier":
            return self.cheap(p)
        g = self.cheap(p)
        if self.form == "cat":
            return torch.cat([p + self.intrinsic_bias.view(1, -1, 1, 1), g], 1)
        if self.form == "cat-bias":
            return torch.cat([p, g], 1) + self.bias.view(1, -1, 1, 1)
        if self.form == "cat-inplace":
            out = torch.cat([p, g], 1)
            out[:, : self.m] += self.intrinsic_bias.view(1, -1, 1, 1)
            return out
        n, _, h, w = p.shape
        layout = torch.channels_last if p.stride(1) == 1 and self.m > 1 else torch.contiguous_format
        out = torch.empty(n, 2 * self.m, h, w, dtype=p.dtype, memory_format=layout)
        torch.cat([p + self.intrinsic_bias.view(1, -1, 1, 1), g], 1, out=out)
        return out


def conv(cin: int, cout: int, kernel: int, stride: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=True)


def compiled_ms(modules: list[nn.Module], x: torch.Tensor, rounds: int) -> list[float]:
    """Median ms of each module under torch.compile (inductor, frozen weights), interleaved."""
    torch._inductor.config.freezing = True
    calls = [torch.compile(module.eval()) for module in modules]
    times: list[list[float]] = [[] for _ in calls]
    with torch.inference_mode():
        for call in calls:
            for _ in range(3):
                call(x)
        for _ in range(rounds):
            for call, out in zip(calls, times, strict=True):
                start = time.perf_counter()
                call(x)
                out.append(time.perf_counter() - start)
    return [1000 * statistics.median(t) for t in times]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument(
        "--runtimes",
        nargs="+",
        choices=["contiguous", "channels_last", "onnxruntime", "compile"],
        default=["contiguous", "channels_last", "onnxruntime"],
    )
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="three shapes, batch 1, 3 rounds")
    parser.add_argument("--results", default=None, help="results name (default ghost_forms)")
    options = parser.parse_args(argv)
    torch.set_num_threads(options.threads)
    shapes = QUICK_SHAPES if options.quick else SHAPES
    batch = 1 if options.quick else options.batch
    rounds = 3 if options.quick else options.rounds
    columns = ["layer", "runtime", "conv ms", *FORMS]
    print(f"batch {batch}, {options.threads} threads, {rounds} interleaved rounds, medians")
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    rows = []
    for runtime in options.runtimes:
        totals = [0.0] * (len(FORMS) + 1)
        for cin, cout, kernel, stride, size in shapes:
            torch.manual_seed(0)
            modules = {"conv": conv(cin, cout, kernel, stride)}
            modules.update({f: DeployedGhost(cin, cout, kernel, stride, f) for f in FORMS})
            shape = (batch, cin, size, size)
            if runtime == "compile":
                layout = torch.channels_last
                x = torch.randn(shape).contiguous(memory_format=layout)
                ms = compiled_ms([m.to(memory_format=layout) for m in modules.values()], x, rounds)
            else:
                eager = runtime != "onnxruntime"
                database = TimingDatabase("eager" if eager else "onnxruntime", cache=False)
                database.rounds = rounds
                timed = database.time(modules, shape, layout=runtime if eager else "contiguous")
                ms = [timed[name] for name in modules]
            totals = [a + b for a, b in zip(totals, ms, strict=True)]
            layer = f"{cin}->{cout} {kernel}x{kernel}/{stride} @{size}"
            rows.append([layer, runtime, ms[0], *[ms[0] / t for t in ms[1:]]])
            print("| " + " | ".join(_cells(rows[-1])) + " |", flush=True)
        rows.append(["all layers", runtime, totals[0], *[totals[0] / t for t in totals[1:]]])
        print("| " + " | ".join(_cells(rows[-1])) + " |", flush=True)
    table = Table(
        "forms",
        f"Deployed GhostModule forms per ResNet-50 layer shape (batch {batch}): speed-up over "
        "the folded convolution",
        columns,
        rows,
        notes="Ratio 2, 3x3 cheap op, identity channel order; conv ms: the folded conv's median.",
    )
    command = "python benchmarks/ghost_forms.py " + " ".join(sys.argv[1:] if argv is None else argv)
    name = options.results or ("ghost_forms-quick" if options.quick else "ghost_forms")
    print("wrote", write_results(name, [table], command=command, conditions={"batch": batch}))


def _cells(row: list) -> list[str]:
    return [row[0], row[1], f"{row[2]:.2f}", *[f"x{v:.2f}" for v in row[3:]]]


if __name__ == "__main__":
    main()
