"""The whole-model parts of a savings report, pure functions of the two models' counts: the
totals, the conventions (how the figures were obtained, what they leave out) and provenance."""

from __future__ import annotations

import platform
from datetime import datetime, timezone
from typing import Any

import torch
from torch import nn

from ..utils import package_version, plain_data
from . import counting
from .model import LayerSaving

UNIT_NOTE = (
    "MACs: fvcore counts one fused multiply-add as one 'flop', so every figure is a count of "
    "multiply-accumulates (1 MAC = 2 FLOPs in PyTorch's FlopCounterMode convention)"
)
PARAMS_NOTE = (
    "fvcore.nn.parameter_count: every nn.Parameter once (a shared one once), BatchNorm affine "
    "weights and biases included, buffers excluded"
)


def _ratio(before: int, after: int) -> float | None:
    return round(before / after, 4) if after else None


def _percent(before: int, after: int) -> float | None:
    return round(100 * (before - after) / before, 2) if before else None


def totals(
    before: counting.MacCount, after: counting.MacCount, params_before: int, params_after: int
) -> dict[str, Any]:
    """MACs and parameters before and after, saved, as a ratio and in percent."""
    return {
        "macs_before": before.total,
        "macs_after": after.total,
        "macs_saved": before.total - after.total,
        "macs_ratio": _ratio(before.total, after.total),
        "macs_reduction_percent": _percent(before.total, after.total),
        "params_before": params_before,
        "params_after": params_after,
        "params_saved": params_before - params_after,
        "params_ratio": _ratio(params_before, params_after),
        "params_reduction_percent": _percent(params_before, params_after),
        "macs_by_operator": {"before": before.by_operator, "after": after.by_operator},
    }


def conventions(
    count_before: counting.MacCount,
    count_after: counting.MacCount,
    args: tuple[Any, ...],
    include_batchnorm: bool,
    fallback: str | None,
    layers: list[LayerSaving],
) -> dict[str, Any]:
    """How the figures were obtained and what they leave out."""
    return {
        "unit": "MACs",
        "unit_note": UNIT_NOTE,
        "counter": count_after.counter,
        "fallback_reason": fallback,
        "batchnorm_included": count_before.batchnorm_included or count_after.batchnorm_included,
        "batchnorm_note": _batchnorm_note(include_batchnorm, fallback),
        "mode": "eval(), on deep copies: the model passed in is not changed",
        "inputs": [_describe_input(arg) for arg in args],
        "parameters": PARAMS_NOTE,
        "original_rebuilt_from": (
            "the conversion record's kept original layers where present, else each "
            "GhostModule's conv_config() (the replaced convolution's settings) in a layer of "
            "its primary's kind"
        ),
        "unsupported_ops": {
            "before": count_before.unsupported_ops,
            "after": count_after.unsupported_ops,
        },
        "unsupported_ops_note": (
            "operators the counter has no formula for, with how often each ran: their cost is "
            "not in the totals"
            if fallback is None
            else "FlopCounterMode does not list the operators it has no formula for; only "
            "convolutions, matrix products and attention are in the totals"
        ),
        "unsupported_ops_without_macs": sorted(
            op
            for op in {**count_before.unsupported_ops, **count_after.unsupported_ops}
            if op in counting.DATA_MOVEMENT_OPS
        ),
        "uncalled_layers": [row.name for row in layers if row.calls == 0],
        "converted_dims": sorted({row.dims for row in layers}),
    }


def _batchnorm_note(include_batchnorm: bool, fallback: str | None) -> str:
    if fallback is not None:
        return "not included: FlopCounterMode has no formula for BatchNorm"
    if include_batchnorm:
        return (
            "included, as fvcore counts it by default (eval mode: 2 MACs per element with an "
            "affine transform); pass include_batchnorm=False (CLI: --no-batchnorm) to leave it out"
        )
    return "not included (include_batchnorm=False): BatchNorm is usually folded into the conv"


def _describe_input(arg: Any) -> dict[str, Any]:
    if isinstance(arg, torch.Tensor):
        return {"shape": list(arg.shape), "dtype": str(arg.dtype).removeprefix("torch.")}
    return {"type": type(arg).__name__}


def provenance(
    model: nn.Module, plan: dict[str, Any], spec: str | None, timestamp: bool
) -> dict[str, Any]:
    """What made the report: package versions, the model's class, its SPEC and plan."""
    cls = type(model)
    result: dict[str, Any] = {
        "ghostify": package_version("ghostify"),
        "torch": torch.__version__,
        "fvcore": package_version("fvcore"),
        "python": platform.python_version(),
        "model_class": f"{cls.__module__}.{cls.__qualname__}",
        "spec": spec,
        "plan": plain_data(plan, "the conversion plan"),
    }
    if timestamp:
        result["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return result
