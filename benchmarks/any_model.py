"""Issue 11's targets: timm's conv subclasses and torchvision's video models, converted, measured.

    python benchmarks/any_model.py [--ratio 2] [--dw-size 3|auto] [--only NAME ...] [--init scratch]

For each model (random initialisation, no weights downloaded) this converts a copy with
``example_inputs``, then prints, side by side:

- the non-stem, non-depthwise convolutions (any dimensions, subclasses included) and how many of
  them were converted (target: at least 90% for the four timm models);
- the conv classes converted, and the dimensions (``converted_dims``);
- MACs and parameters before and after, measured by ``ghostify.report`` (fvcore; target: MACs
  down at least 1.7x at ratio 2 for the timm models, and down for the video models), with the
  converted layers' own ratio and the whole model's ceiling at this ratio (the converted layers
  cut by exactly ``ratio``, ghosts free: what the layers left as they are allow at best);
- the worst difference, over the converted layers, between a layer's intrinsic output channels
  and the original layer's own output on a random input (0 up to float rounding: the primary is
  the original's own kind holding its kept filters).

``--init scratch`` skips the data-free fit (the figures above do not depend on it; it is slow on
a CPU for these sizes). Writes benchmarks/results/any_model.json (``any_model-dwauto.json``
with ``--dw-size auto``).
"""

from __future__ import annotations

import argparse
import collections
import copy
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

import ghostify
from ghostify.layers.conv_types import TORCH_CONVS
from ghostify.surgery.discovery import discover
from ghostify.testing.results import Table, write_results


@dataclass(frozen=True)
class Target:
    name: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    min_fraction: float | None  # of non-stem, non-depthwise convs converted
    min_macs_ratio: float | None


def _timm(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False)

    return build


def _video(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        return torchvision.models.get_model(name, weights=None)

    return build


TARGETS = [
    Target("nf_resnet50", _timm("nf_resnet50"), (1, 3, 224, 224), 0.9, 1.7),
    Target("resnetv2_50x1_bit", _timm("resnetv2_50x1_bit"), (1, 3, 224, 224), 0.9, 1.7),
    Target("tf_efficientnet_b0", _timm("tf_efficientnet_b0"), (1, 3, 224, 224), 0.9, 1.7),
    Target("tf_mobilenetv3_large_100", _timm("tf_mobilenetv3_large_100"), (1, 3, 224, 224),
           0.9, 1.7),
    Target("r3d_18", _video("r3d_18"), (1, 3, 8, 112, 112), None, 1.0),
    Target("mc3_18", _video("mc3_18"), (1, 3, 8, 112, 112), None, 1.0),
    Target("r2plus1d_18", _video("r2plus1d_18"), (1, 3, 8, 112, 112), None, 1.0),
    Target("s3d", _video("s3d"), (1, 3, 16, 224, 224), None, 1.0),
]  # fmt: skip


def candidates(model: nn.Module, x: torch.Tensor) -> list[str]:
    """Names of the non-stem, non-depthwise convolutions (every class, every dimension)."""
    sites = [site for site in discover(model, (x,)).sites if site.kind == "conv"]
    stem = sites[0].name if sites and sites[0].order is not None else None
    return [
        site.name
        for site in sites
        if site.name != stem
        and not (site.module.groups > 1 and site.module.in_channels == site.module.groups)
    ]


@torch.no_grad()
def worst_intrinsic_error(model: nn.Module) -> float:
    """Largest |ghost intrinsic output - original output| over the converted layers (relative).

    Channel-order folding permuted some layers' outputs (their consumers absorbed it) and so
    the input channels of the converted layers reading them: both are undone here.
    """
    record = ghostify.record_of(model)
    input_order = {  # converted layer -> original input channel at each of its inputs
        perm.module.removesuffix(".primary_conv"): torch.tensor(perm.index)
        for row in record.layers
        for perm in row.folded_into
        if perm.module.endswith(".primary_conv") and perm.dim == 1
    }
    worst = 0.0
    for row in record.layers:
        ghost, original = model.get_submodule(row.name).eval(), row.original.eval()
        size = [3 * max(k, 1) + 5 for k in row.conv["kernel_size"]]
        x = torch.randn(1, row.conv["in_channels"], *size)
        x_ghost = x[:, input_order[row.name]] if row.name in input_order else x
        # Output position p holds original channel output_order[p] (its channel group's
        # order), or p itself; the primary computes the positions its gather reads below m.
        at = ghost.intrinsic_index
        channel = torch.tensor(row.output_order)[at] if row.output_order is not None else at
        want, got = original(x)[:, channel], ghost(x_ghost)[:, at]
        worst = max(worst, float((got - want).abs().max() / want.abs().max().clamp_min(1e-12)))
    return worst


def run(target: Target, ratio: int, dw_size: int | str, init: str) -> dict:
    torch.manual_seed(0)
    model = target.build().eval()
    x = torch.randn(target.input_shape)
    wanted = candidates(model, x)
    start = time.perf_counter()
    converted = ghostify.convert(
        copy.deepcopy(model), ratio=ratio, dw_size=dw_size, example_inputs=x, init=init
    )
    seconds = time.perf_counter() - start
    plan = ghostify.plan_of(converted)
    names = {row["name"] for row in plan["layers"]}
    savings = ghostify.report(converted, x)
    totals = savings.totals
    layers_before = sum(row.macs_before for row in savings.layers)
    layers_after = sum(row.macs_after for row in savings.layers)
    best = totals["macs_before"] - layers_before * (1 - 1 / ratio)  # converted layers / ratio
    types = collections.Counter(row["type"].rsplit(".", 1)[-1] for row in plan["layers"])
    all_convs = sum(isinstance(m, tuple(TORCH_CONVS)) for m in model.modules())
    return {
        "model": target.name,
        "convs": all_convs,
        "candidates": len(wanted),
        "converted": len(names & set(wanted)),
        "fraction": len(names & set(wanted)) / max(1, len(wanted)),
        "types": dict(types),
        "dims": plan["converted_dims"],
        "macs_before": totals["macs_before"],
        "macs_after": totals["macs_after"],
        "macs_ratio": totals["macs_ratio"],
        "layers_ratio": layers_before / max(1, layers_after),
        "ceiling": totals["macs_before"] / best,
        "params_ratio": totals["params_ratio"],
        "intrinsic_error": worst_intrinsic_error(converted) if init == "weights" else None,
        "seconds": seconds,
        "skipped": collections.Counter(row["reason"].split(";")[0][:70] for row in plan["skipped"]),
    }


def verdict(target: Target, res: dict) -> str:
    ok = res["macs_ratio"] is not None and res["macs_ratio"] > (target.min_macs_ratio or 1.0)
    if target.min_macs_ratio and target.min_macs_ratio > 1.0:
        ok = ok and res["macs_ratio"] >= target.min_macs_ratio
    if target.min_fraction is not None:
        ok = ok and res["fraction"] >= target.min_fraction
    return "met" if ok else "MISSED"


def _error(value: float | None) -> str:
    return "-" if value is None else f"{value:.1e}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=int, default=2)
    parser.add_argument("--dw-size", type=lambda v: v if v == "auto" else int(v), default=3)
    parser.add_argument("--init", choices=("weights", "scratch"), default="weights")
    parser.add_argument("--only", nargs="*", help="model names to run (default: all)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        "| model | convs | non-stem non-depthwise | converted | types | dims | GMACs before "
        "| GMACs after | MACs ratio | layers' ratio | ceiling | params ratio | intrinsic err "
        "| convert s | target |"
    )
    print("|---|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    rows = []
    for target in TARGETS:
        if args.only and target.name not in args.only:
            continue
        res = run(target, args.ratio, args.dw_size, args.init)
        types = ", ".join(f"{k} {v}" for k, v in res["types"].items())
        print(
            f"| {res['model']} | {res['convs']} | {res['candidates']} | {res['converted']} "
            f"({100 * res['fraction']:.0f}%) | {types} | {res['dims']} | "
            f"{res['macs_before'] / 1e9:.3f} | {res['macs_after'] / 1e9:.3f} | "
            f"{res['macs_ratio']:.3f}x | {res['layers_ratio']:.3f}x | {res['ceiling']:.3f}x | "
            f"{res['params_ratio']:.3f}x | "
            f"{_error(res['intrinsic_error'])} | {res['seconds']:.1f} | {verdict(target, res)} |",
            flush=True,
        )
        for reason, count in res["skipped"].items():
            print(f"|   skipped {count}: {reason} |")
        rows.append(
            [
                res["model"],
                types,
                f"{res['converted']}/{res['candidates']}",
                round(res["macs_before"] / 1e9, 3),
                round(res["macs_after"] / 1e9, 3),
                f"{res['macs_ratio']:.2f}x",
                f"{res['params_ratio']:.2f}x",
                verdict(target, res),
            ]
        )
    table = Table(
        "models",
        f"Conv subclasses and Conv3d models at ratio {args.ratio}, dw_size {args.dw_size}",
        [
            *("model", "conv types converted", "non-stem, non-depthwise converted"),
            *("GMACs before", "GMACs after", "MACs ratio", "params ratio", "target"),
        ],
        rows,
        "Random initialisation; MACs and parameters counted by ghostify.report (fvcore).",
    )
    name = "any_model" if args.dw_size == 3 else f"any_model-dw{args.dw_size}"
    print(write_results(name, [table]))


if __name__ == "__main__":
    main()
