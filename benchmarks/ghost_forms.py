"""Formulations of a deployed GhostModule's forward pass, timed side by side per layer shape.

    python benchmarks/ghost_forms.py [--batch 8] [--repeats 30]

The deployed module computes ``cat(primary(x), cheap(primary(x))) + bias``: two convolutions,
one concatenation copy and one bias pass. The forms below try to save memory traffic:

- ``cat+bias``: what ghostify.deploy runs (bias added once, after the concatenation);
- ``bias-in-convs``: the ghost half's bias inside the cheap conv, the intrinsic half's added
  before the concatenation (the cheap op must see the unbiased primary output, so it is added
  out of place);
- ``prealloc``: both halves written into one preallocated buffer with ``torch.cat(out=)``;
- ``dw-multiplier``: no concatenation at all: one depthwise conv with a channel multiplier of 2
  writes every output channel from the primary output (a centre-tap kernel copies each
  intrinsic channel, the other slot is its ghost) with every shift in its bias;
- ``compiled``: ``torch.compile`` (inductor) of the module alone.

Each row: median ms of the plain Conv2d, then every form's speed-up over it, in ``--layout``.
Shapes are ResNet-50's (224x224 input, ratio 2).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

SHAPES = [  # (in, out, kernel, stride, spatial) of ResNet-50 layers
    (256, 64, 1, 1, 56),
    (64, 64, 3, 1, 56),
    (64, 256, 1, 1, 56),
    (512, 128, 1, 1, 28),
    (128, 128, 3, 1, 28),
    (1024, 256, 1, 1, 14),
    (256, 256, 3, 1, 14),
    (2048, 512, 1, 1, 7),
    (512, 512, 3, 1, 7),
    (512, 2048, 1, 1, 7),
]


LAYOUTS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}


class Forms(nn.Module):
    """The deployed GhostModule's pieces, with one forward per formulation."""

    def __init__(self, cin: int, cout: int, k: int, stride: int) -> None:
        super().__init__()
        m = cout // 2
        self.primary = nn.Conv2d(cin, m, k, stride, k // 2, bias=False)
        self.cheap = nn.Conv2d(m, m, 3, 1, 1, groups=m, bias=False)
        self.cheap_biased = nn.Conv2d(m, m, 3, 1, 1, groups=m, bias=True)
        self.cheap_all = nn.Conv2d(m, cout, 3, 1, 1, groups=m, bias=True)
        self.bias = nn.Parameter(torch.randn(cout))
        self.m = m

    def cat_bias(self, x: torch.Tensor) -> torch.Tensor:
        p = self.primary(x)
        return torch.cat([p, self.cheap(p)], 1) + self.bias.view(1, -1, 1, 1)

    def bias_in_convs(self, x: torch.Tensor) -> torch.Tensor:
        p = self.primary(x)
        g = self.cheap_biased(p)
        return torch.cat([p + self.bias[: self.m].view(1, -1, 1, 1), g], 1)

    def prealloc(self, x: torch.Tensor) -> torch.Tensor:
        p = self.primary(x)
        g = self.cheap(p)
        n, _, h, w = p.shape
        layout = torch.channels_last if p.stride(1) == 1 else torch.contiguous_format
        out = torch.empty(n, 2 * self.m, h, w, dtype=p.dtype, memory_format=layout)
        torch.cat([p, g], 1, out=out)
        return out.add_(self.bias.view(1, -1, 1, 1))

    def dw_multiplier(self, x: torch.Tensor) -> torch.Tensor:
        return self.cheap_all(self.primary(x))


def median_ms(fns, x, repeats):
    times = [[] for _ in fns]
    with torch.inference_mode():
        for fn in fns:
            for _ in range(3):
                fn(x)
        for _ in range(repeats):
            for i, fn in enumerate(fns):
                start = time.perf_counter()
                fn(x)
                times[i].append(time.perf_counter() - start)
    return [1000 * statistics.median(t) for t in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--compile", action="store_true", help="add the torch.compile column")
    parser.add_argument("--layout", choices=sorted(LAYOUTS), default="channels_last")
    options = parser.parse_args()
    torch.set_num_threads(2)
    layout = LAYOUTS[options.layout]
    names = ["cat+bias", "bias-in-convs", "prealloc", "dw-multiplier"]
    names += ["compiled"] if options.compile else []
    print(f"batch {options.batch}, {options.layout}, 2 threads, {options.repeats} interleaved runs")
    print("| layer | Conv2d ms | " + " | ".join(names) + " |")
    print("|---|---:|" + "---:|" * len(names))
    totals = [0.0] * (len(names) + 1)
    for cin, cout, k, s, hw in SHAPES:
        conv = nn.Conv2d(cin, cout, k, s, k // 2).eval().to(memory_format=layout)
        forms = Forms(cin, cout, k, s).eval().to(memory_format=layout)
        fns = [conv, forms.cat_bias, forms.bias_in_convs, forms.prealloc, forms.dw_multiplier]
        if options.compile:
            fns.append(torch.compile(forms.cat_bias))
        x = torch.randn(options.batch, cin, hw, hw).to(memory_format=layout)
        ms = median_ms(fns, x, options.repeats)
        totals = [a + b for a, b in zip(totals, ms, strict=True)]
        ratios = " | ".join(f"x{ms[0] / t:.2f}" for t in ms[1:])
        print(f"| {cin}->{cout} {k}x{k} @{hw} | {ms[0]:.2f} | {ratios} |")
    ratios = " | ".join(f"x{totals[0] / t:.2f}" for t in totals[1:])
    print(f"| all layers | {totals[0]:.2f} | {ratios} |")


if __name__ == "__main__":
    main()
