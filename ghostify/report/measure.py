"""Measuring what a conversion saved: fvcore on the converted model and on the original.

``report(model, example_inputs)`` needs only the converted model. The original is the one the
conversion record kept (``ghostify.original_model``) when it is there; otherwise each GhostModule
is replaced by a zero-weight layer of its original's kind and settings (``nn.ConvNd(**module.
conv_config())``, or a widened copy of a timm/user primary), so a later audit that has
only the converted checkpoint gets the same figures. Both models are counted on deep copies in
eval mode; the model passed in is never changed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from torch import nn

from ..errors import ConfigError
from ..inputs import as_args, describe_args
from ..layers.conv_types import TORCH_CONVS
from ..layers.ghost_module import GhostModule, conv_config
from ..progress import Steps, check_progress
from ..surgery.discovery import ConvSite, list_sites, recording_calls
from ..surgery.latency import time_layer
from ..surgery.plan import plan_of
from ..surgery.record import record_of
from ..utils import describe_error
from . import counting, summary
from .model import LayerSaving, SkippedLayer
from .originals import counting_copy, rebuild_original
from .savings import SavingsReport


def report(
    model: nn.Module,
    example_inputs: Any,
    *,
    plan: dict[str, Any] | None = None,
    include_batchnorm: bool = True,
    spec: str | None = None,
    timestamp: bool = False,
    progress: bool | Callable[[str], None] | None = None,
    latency: bool = False,
) -> SavingsReport:
    """Measure what converting ``model`` saved, with fvcore, on ``model(*example_inputs)``.

    ``model`` is a converted model (GhostModules in place of convolutions); the original is
    rebuilt from each GhostModule's recorded configuration. ``plan`` (from ``plan_of``, or one
    saved in a checkpoint) supplies the skip reasons; by default ``plan_of(model)`` is used.
    ``include_batchnorm=False`` leaves BatchNorm out of the MAC totals (fvcore counts it by
    default). ``spec`` is recorded in the provenance; ``timestamp=True`` adds the creation time
    (the only field that differs between two runs on the same model and inputs).
    ``latency=True`` also times every converted layer against the original convolution on the
    input shape it sees, on this machine (``original_ms`` / ``ghost_ms`` per row).
    ``progress``: a tqdm bar over the counting steps on stderr (None: only in a terminal outside
    pytest; False: never; True: always), or a callable that gets each step's description.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    args = as_args(example_inputs)
    say = progress if callable(progress) else None
    bars = None if say is not None else check_progress(progress)
    plan = plan_of(model) if plan is None else plan

    after = counting_copy(model)
    before = rebuild_original(after).eval()
    sites = list_sites(after)
    ghost_sites = [site for site in sites.values() if site.kind == "ghost"]
    ghosts = {site.name: site for site in ghost_sites}

    with Steps(4, "counting MACs", bars, say) as steps:
        steps.step("running the converted model once (FlopCounterMode cross-check)")
        with recording_calls(ghost_sites):
            torch_after = _eager_count(after, args)
        steps.done()
        steps.step("running the original model once (FlopCounterMode cross-check)")
        # the originals' calls, to tell whether both models did the same work (scripted convs
        # run no hooks: nothing to compare)
        before_sites = [
            site
            for name, site in list_sites(before).items()
            if name in ghosts and site.kind != "scripted"
        ]
        with recording_calls(before_sites):
            torch_before = _eager_count(before, args)
        steps.done()
        fallback = None
        try:
            steps.step("tracing and counting the original model with fvcore")
            count_before = counting.fvcore_count(before, args, include_batchnorm=include_batchnorm)
            steps.done()
            steps.step("tracing and counting the converted model with fvcore")
            count_after = counting.fvcore_count(after, args, include_batchnorm=include_batchnorm)
            steps.done()
        except Exception as error:  # fvcore relies on TorchScript tracing; any failure: fallback
            fallback = (
                f"fvcore could not trace the model ({describe_error(error)}); every figure "
                f"comes from {counting.FLOP_COUNTER} instead, which does not count BatchNorm, "
                "pooling or element-wise operations"
            )
            steps.step("fvcore could not trace the model; counting with FlopCounterMode instead")
            count_before, count_after = torch_before, torch_after

    params_before = counting.count_params(before)
    params_after = counting.count_params(after)
    positions = {name: index for index, name in enumerate(sites)}  # the model's order
    layers = _layer_rows(after, ghosts, count_before, count_after, params_before, params_after)
    layers = [dataclasses.replace(row, position=positions[row.name]) for row in layers]
    if latency:
        with Steps(1, "timing layers", bars, say) as steps:
            steps.step("timing every converted layer against its original")
            layers = _with_latency(layers, ghosts, before)
            steps.done()
    skipped = _skipped_rows(sites, plan, count_after, params_after)
    totals = summary.totals(count_before, count_after, params_before[""], params_after[""])
    saved_by_rows = sum(row.macs_saved for row in layers)
    cross_check = _cross_check(count_before, count_after, torch_before, torch_after, fallback)
    cross_check["layer_rows_add_up"] = saved_by_rows == totals["macs_saved"]
    cross_check.update(_workload_check(ghosts, before_sites))
    conventions = summary.conventions(
        count_before, count_after, args, include_batchnorm, fallback, layers
    )
    provenance = summary.provenance(model, plan, spec, timestamp)
    return SavingsReport(totals, layers, skipped, conventions, cross_check, provenance)


def _eager_count(model: nn.Module, args: tuple[Any, ...]) -> counting.MacCount:
    try:
        return counting.flop_counter_count(model, args)
    except counting.InputsRejected as error:
        raise ConfigError(
            f"the model rejected example_inputs ({describe_args(args)}): {error}; pass inputs of "
            "the shape, dtype and device the model expects"
        ) from error.__cause__


def _layer_rows(
    after: nn.Module,
    ghosts: dict[str, ConvSite],
    count_before: counting.MacCount,
    count_after: counting.MacCount,
    params_before: dict[str, int],
    params_after: dict[str, int],
) -> list[LayerSaving]:
    aliases: dict[int, list[str]] = {}
    for name, module in after.named_modules(remove_duplicate=False):
        if isinstance(module, GhostModule) and name not in ghosts:
            aliases.setdefault(id(module), []).append(name)
    rows = []
    for name, site in ghosts.items():
        module = site.module
        config = module.conv_config()
        rows.append(
            LayerSaving(
                name=name,
                in_channels=config["in_channels"],
                out_channels=config["out_channels"],
                kernel_size=config["kernel_size"],
                stride=config["stride"],
                padding=config["padding"],
                dilation=config["dilation"],
                groups=config["groups"],
                bias=config["bias"],
                ratio=module.ratio,
                dw_size=module.dw_size,
                dims=module.dims,
                primary_type=type(module.primary_conv).__qualname__,
                intrinsic_channels=module.intrinsic_channels,
                output_shape=list(site.output_shapes[0]) if site.output_shapes else None,
                calls=site.calls,
                macs_before=count_before.by_module.get(name, 0),
                macs_after=count_after.by_module.get(name, 0),
                params_before=params_before.get(name, 0),
                params_after=params_after.get(name, 0),
                aliases=sorted(aliases.get(id(module), [])),
                **_fit_of(after, name),
            )
        )
    return rows


def _fit_of(model: nn.Module, name: str) -> dict[str, Any]:
    """How a calibrated conversion fitted layer ``name`` (from the record), if it did."""
    rows = record_of(model).layers if record_of(model) is not None else []  # type: ignore[union-attr]
    row = next((r for r in rows if name in (r.name, *r.aliases) and r.fit_method), None)
    return {} if row is None else {"fit_method": row.fit_method, "fit_error": row.fit_error}


def _with_latency(
    rows: list[LayerSaving], ghosts: dict[str, ConvSite], before: nn.Module
) -> list[LayerSaving]:
    """Each row with the median time of the original conv and of the GhostModule, here."""
    timed = []
    for row in rows:
        site = ghosts[row.name]
        if not site.input_shapes:  # never called on these inputs
            timed.append(row)
            continue
        timing = time_layer(before.get_submodule(row.name), site.module, site.input_shapes[0])
        timed.append(
            dataclasses.replace(
                row,
                original_ms=round(timing.original_ms, 4),
                ghost_ms=round(timing.ghost_ms, 4),
            )
        )
    return timed


def _skipped_rows(
    sites: dict[str, Any],
    plan: dict[str, Any],
    count_after: counting.MacCount,
    params_after: dict[str, int],
) -> list[SkippedLayer]:
    reasons = {row["name"]: row["reason"] for row in plan.get("skipped", [])}
    rows = []
    for position, (name, site) in enumerate(sites.items()):  # the model's order
        if site.kind == "ghost":
            continue
        reason = reasons.get(name, "not in the conversion plan (no reason recorded)")
        config = conv_config(site.module) if isinstance(site.module, tuple(TORCH_CONVS)) else {}
        rows.append(
            SkippedLayer(
                name=name,
                reason=reason,
                in_channels=config.get("in_channels"),
                out_channels=config.get("out_channels"),
                kernel_size=config.get("kernel_size"),
                stride=config.get("stride"),
                groups=config.get("groups"),
                macs=count_after.by_module.get(name, 0),
                params=params_after.get(name, 0),
                position=position,
            )
        )
    return rows


def _cross_check(
    before: counting.MacCount,
    after: counting.MacCount,
    torch_before: counting.MacCount,
    torch_after: counting.MacCount,
    fallback: str | None,
) -> dict[str, Any]:
    """Conv and linear MACs by the report's counter against FlopCounterMode's (halved)."""
    result: dict[str, Any] = {
        "tool": counting.FLOP_COUNTER,
        "rule": "FlopCounterMode counts 2 FLOPs per MAC; its figures are halved to compare",
    }
    if fallback is not None:
        result["agree"] = None
        result["note"] = "no independent count: FlopCounterMode is the report's own counter here"
        return result
    agree = True
    for label, count, torch_count in (
        ("before", before, torch_before),
        ("after", after, torch_after),
    ):
        result[label] = {
            "conv": {"fvcore": count.conv, "flop_counter": torch_count.conv},
            "linear": {"fvcore": count.linear, "flop_counter": torch_count.linear},
        }
        agree = agree and count.conv == torch_count.conv and count.linear == torch_count.linear
    result["agree"] = agree
    return result


def _workload_check(ghosts: dict[str, ConvSite], before_sites: list[ConvSite]) -> dict[str, Any]:
    """Whether each converted layer ran as often, on the same input shapes, as its original.

    A model whose work depends on its activations (a detector's per-box heads run on however many
    boxes survive the score threshold and NMS) can take a different path once converted; then
    the totals compare two different workloads, not the cost of the same computation."""
    differs = []
    for site in before_sites:
        ghost = ghosts[site.name]
        if (site.calls, site.input_shapes) != (ghost.calls, ghost.input_shapes):
            differs.append(site.name)
    result: dict[str, Any] = {"same_workload": not differs, "workload_differs": sorted(differs)}
    if differs:
        result["workload_note"] = (
            f"{len(differs)} converted layer(s) ran a different number of times or on other input "
            "shapes than their originals (data-dependent control flow, e.g. a detector's per-box "
            "heads): the MAC totals compare different workloads; fix the data-dependent part "
            "(e.g. the number of detections) to compare like with like"
        )
    return result
