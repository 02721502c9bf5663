"""Hugging Face ``transformers`` vision models, built from their configs (no weights), converted.

    pip install transformers        # not a ghostify dependency
    python benchmarks/hf_vision.py [--only ResNet ...] [--init scratch]

For each model: convert a copy with ``example_inputs``, then check that the outputs keep their
structure and shapes and hold no NaN/Inf, and measure MACs with ``ghostify.report``. A first look
at the ecosystem (issue 11), not the full sweep.
"""

from __future__ import annotations

import argparse
import collections
import copy
import time
import traceback

import torch

import ghostify


def _configs() -> dict[str, tuple[object, tuple[int, ...]]]:
    import transformers as hf

    return {
        "ResNet": (hf.ResNetConfig(), (1, 3, 224, 224)),
        "ConvNeXt": (hf.ConvNextConfig(), (1, 3, 224, 224)),
        "MobileNetV2": (hf.MobileNetV2Config(), (1, 3, 224, 224)),
        "MobileViT": (hf.MobileViTConfig(), (1, 3, 256, 256)),
        "RegNet": (hf.RegNetConfig(), (1, 3, 224, 224)),
        "SegFormer": (hf.SegformerConfig(), (1, 3, 256, 256)),
    }


def _model(name: str, config: object) -> torch.nn.Module:
    import transformers as hf

    classes = {
        "ResNet": hf.ResNetForImageClassification,
        "ConvNeXt": hf.ConvNextForImageClassification,
        "MobileNetV2": hf.MobileNetV2ForImageClassification,
        "MobileViT": hf.MobileViTForImageClassification,
        "RegNet": hf.RegNetForImageClassification,
        "SegFormer": hf.SegformerForSemanticSegmentation,
    }
    return classes[name](config).eval()


def _tensors(output: object) -> dict[str, torch.Tensor]:
    """The tensors of a ModelOutput (or a plain tensor), by key."""
    if isinstance(output, torch.Tensor):
        return {"out": output}
    return {key: value for key, value in output.items() if isinstance(value, torch.Tensor)}


def check(name: str, init: str) -> dict:
    config, shape = _configs()[name]
    torch.manual_seed(0)
    model = _model(name, config)
    x = torch.randn(shape)
    with torch.no_grad():
        want = _tensors(model(x))
    start = time.perf_counter()
    converted = ghostify.convert(copy.deepcopy(model), example_inputs=x, init=init)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        got = _tensors(converted(x))
    problems = []
    if {k: v.shape for k, v in got.items()} != {k: v.shape for k, v in want.items()}:
        problems.append("output structure differs")
    problems += [f"{k} has NaN/Inf" for k, v in got.items() if not torch.isfinite(v).all()]
    plan = ghostify.plan_of(converted)
    totals = ghostify.report(converted, x).totals
    return {
        "model": name,
        "converted": len(plan["layers"]),
        "skipped": collections.Counter(r["reason"].split(";")[0][:60] for r in plan["skipped"]),
        "found_by": collections.Counter(r["found_by"] for r in plan["layers"]),
        "macs_ratio": totals["macs_ratio"],
        "seconds": seconds,
        "problems": problems,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*")
    parser.add_argument("--init", choices=("weights", "scratch"), default="weights")
    args = parser.parse_args()
    torch.set_num_threads(2)
    print("| model | converted | found by | MACs ratio | convert s | result | skipped |")
    print("|---|---:|---|---:|---:|---|---|")
    for name in _configs():
        if args.only and name not in args.only:
            continue
        try:
            res = check(name, args.init)
        except Exception as error:  # report and go on: this is a survey
            last = traceback.format_exc().strip().splitlines()[-1]
            print(f"| {name} | - | - | - | - | FAIL: {type(error).__name__}: {last[:200]} | |")
            continue
        result = "ok" if not res["problems"] else "; ".join(res["problems"])
        skipped = ", ".join(f"{reason} ({n})" for reason, n in res["skipped"].items())
        found = ", ".join(f"{k} {v}" for k, v in res["found_by"].items())
        print(
            f"| {name} | {res['converted']} | {found} | {res['macs_ratio']:.3f}x | "
            f"{res['seconds']:.1f} | {result} | {skipped} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
