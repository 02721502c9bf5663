"""``plan_budget``: choose every layer's form to meet a budget with the least loss.

1. Discover the convolutions the conversion rules select (``convert``'s own rules: stem,
   patterns, subclasses), and each one's forms with their exact MACs and parameters
   (``choices``).
2. Per form, its loss: the relative output error on the calibration data, or the data-free fit's
   residual (``loss``), times the layer's sensitivity weight (``sensitivity``).
3. For a speed-up, per form its deployed time here (``latency``, cached on disk).
4. Solve exactly (``solver``): the Pareto frontier of (cost, loss) over every plan, and the
   lowest-loss plan within the budget. A MAC or parameter budget is then met exactly (fvcore's
   counts); a speed-up plan is measured and tightened until it is (``verify``).

Nothing here changes the model: every model built or timed is a copy. An unreachable budget is a
``ConfigError`` naming the best reachable figure.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import torch
from threadpoolctl import threadpool_limits
from torch import nn

from ..errors import ConfigError
from ..fit.statistics import MAX_PAIR_SUMS
from ..inputs import as_args, describe_args
from ..report import counting
from ..surgery.discovery import discover
from ..surgery.selection import Selection
from ..timing import TimingDatabase
from ..tune import layer_statistics
from ..tune.calibrate import Calibration, prepare
from .choices import LayerOptions, options_for
from .latency import TimeModel, time_choices, time_models
from .loss import data_free_losses, statistics_losses
from .plan import BudgetPlan
from .sensitivity import batchnorm_weights, following_batchnorm, probe_weights
from .solver import Frontier, pareto_frontier
from .target import UNITS, Budget
from .verify import SpeedSearch, deployed, kept_orders

# Calibration inputs the sensitivity probe runs on.
PROBE_SAMPLES = 64
# Frontier points kept for the trade-off chart.
CHART_POINTS = 400


def plan_budget(
    model: nn.Module,
    budget: Budget,
    example_inputs: Any,
    *,
    calibration_data: Any = None,
    select: Selection | None = None,
) -> BudgetPlan:
    """The lowest-loss form of every layer of ``model`` that meets ``budget`` (see the module
    docstring); ``model`` is not changed. ``calibration_data``: as ``convert``'s (inputs, a
    loader or a ``ghostify.Calibration``); without it the losses are data-free."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    if not isinstance(budget, Budget):
        raise ConfigError(f"budget must be a ghostify.Budget; got {type(budget).__name__}")
    if example_inputs is None:
        raise ConfigError(
            f"a budget ({budget.describe()}) needs example_inputs: MACs and times are counted "
            "on the inputs each layer sees"
        )
    select = Selection() if select is None else select
    rules = select.rules(model, 2, 3)
    args = _batched(as_args(example_inputs), budget.batch_size)
    calibration = _calibration(model, calibration_data)
    seconds: dict[str, float] = {}
    with _stage(seconds, "discover"):
        found = discover(model, args)
        first = found.sites[0] if found.sites else None
        stem = first.name if first is not None and first.order is not None else None
        rules = type(rules)(**{**rules.__dict__, "stem": stem})
        layers, unconverted = [], {}
        for site in found.sites:
            if rules.skip_reason(site) is not None:
                continue
            options = options_for(site, budget.ratios, budget.dw_sizes)
            if len(options.choices) > 1:
                layers.append(options)
            else:
                unconverted[site.name] = (
                    "no GhostModule form among the budget's ratios "
                    f"{budget.ratios} and dw_sizes {budget.dw_sizes} saves MACs"
                )
        if not layers:
            raise ConfigError(
                f"nothing to convert for the budget ({budget.describe()}): no convolution the "
                "conversion rules select has a GhostModule form that saves MACs"
            )
        totals = _original_totals(model, args)
    if budget.kind != "speedup":  # known from the counts alone: refused before the heavy work
        _check_reachable(budget, layers, totals)
    with _stage(seconds, "losses"):
        source = _losses(model, layers, calibration)
    with _stage(seconds, "sensitivity"):
        sensitivity = budget.sensitivity
        weights = _weights(sensitivity, model, layers, _probe_inputs(args, calibration))
        for layer in layers:
            layer.loss = [weights[layer.name] * loss for loss in layer.loss]
    plan = BudgetPlan(
        budget=budget,
        layers=layers,
        picks=[0] * len(layers),
        totals=totals,
        loss=0.0,
        loss_source=source,
        sensitivity=sensitivity,
        weights=weights,
        unconverted=unconverted,
        seconds=seconds,
    )
    if budget.kind == "speedup":
        _plan_speed(plan, model, select, args)
    else:
        _plan_count(plan)
    _finish(plan)
    return plan


def _count_limit(budget: Budget, layers: list[LayerOptions], totals: dict[str, int]) -> tuple:
    """(per-layer costs, the limit on their sum, the original's total, the part no choice
    changes) of a MAC or parameter budget."""
    kind = budget.kind
    before = totals[f"{kind}_before"]
    costs = [layer.macs if kind == "macs" else layer.params for layer in layers]
    fixed = before - sum(cost[0] for cost in costs)
    return costs, math.floor(budget.value * before) - fixed, before, fixed


def _check_reachable(budget: Budget, layers: list[LayerOptions], totals: dict[str, int]) -> None:
    """A ConfigError naming the fewest MACs / parameters reachable when the budget asks fewer."""
    costs, limit, before, fixed = _count_limit(budget, layers, totals)
    fewest = sum(min(cost) for cost in costs)
    if fewest <= limit:
        return
    kind, share = budget.kind, (fixed + fewest) / before
    raise ConfigError(
        f"Budget({kind}={budget.value:g}) cannot be met: with ratios {budget.ratios} and "
        f"dw_sizes {budget.dw_sizes} the fewest {UNITS[kind]} reachable are {share:.4f} of the "
        f"original's ({fixed + fewest:,} of {before:,}); ask for {kind} >= "
        f"{math.ceil(share * 1e4) / 1e4:g}, or allow larger ratios (Budget(ratios=...)) or "
        "more layers (include / exclude / skip_stem)"
    )


def _plan_count(plan: BudgetPlan) -> None:
    """MAC or parameter budget: the optimum under an exact integer limit."""
    budget, layers = plan.budget, plan.layers
    kind = budget.kind
    costs, limit, before, fixed = _count_limit(budget, layers, plan.totals)
    with _stage(plan.seconds, "solve"):
        frontier = pareto_frontier(costs, [layer.loss for layer in layers])
    index = frontier.best_within(limit)
    assert index is not None  # _check_reachable made sure the cheapest plan fits
    plan.cost_unit = kind
    plan.picks = frontier.plan(index)
    plan.exact = frontier.exact
    plan.frontier = _chart(frontier, lambda c: (fixed + c) / before)


def _plan_speed(plan: BudgetPlan, model: nn.Module, select: Selection, args: tuple) -> None:
    """Speed-up budget: time the forms, solve on predicted time, measure and tighten."""
    budget = plan.budget
    with _stage(plan.seconds, "deploy original"):
        original = deployed(model, args)
        original_ms = time_models([original], args, budget.runtime)[0]
        kept = kept_orders(model, select, args)
    layout = _layout(original)
    database = TimingDatabase(budget.runtime, cache=budget.timing_cache)
    with _stage(plan.seconds, "time layers"):
        time_choices(plan.layers, database, layout=layout, kept_order=kept)
    keep_ms = sum(layer.ms[0] for layer in plan.layers)
    time_model = TimeModel(keep_ms, original_ms)
    time_model.add(keep_ms, 0, 1.0)  # the plan keeping every layer is the original itself
    search = SpeedSearch(
        model,
        select,
        args,
        budget.runtime,
        plan.layers,
        budget.value,
        original,
        time_model,
        database,
    )
    with _stage(plan.seconds, "measure plans"):
        picks = search.run(budget.verify_rounds, f"Budget(speedup={budget.value:g})")
    plan.picks = picks
    plan.exact = search.exact
    plan.measurements = search.measurements
    plan.measured_losses = {round(ms, 9): loss for ms, loss in search.losses_measured.items()}
    shown = layout if budget.runtime == "eager" else "its own layout"  # ONNX Runtime picks
    plan.runtime, plan.batch_size, plan.layout = budget.runtime, _batch(args), shown
    plan.cost_unit = "ms"
    plan.timing = {
        "measured": database.measured,
        "reused": database.reused,
        "kept_order": len(kept),
    }
    plan.original_deployed, plan.example_args, plan.time_model = original, args, time_model
    plan.predicted_speedup = search.predicted(picks)
    intercept = time_model.coefficients()[0]
    with _stage(plan.seconds, "solve"):
        frontier = search.frontier()
    plan.frontier = _chart(frontier, lambda c: 1.0 / (intercept + c))


def _finish(plan: BudgetPlan) -> None:
    """Totals and loss of the chosen plan."""
    layers, picks = plan.layers, plan.picks
    plan.loss = float(sum(layer.loss[p] for layer, p in zip(layers, picks, strict=True)))
    for kind in ("macs", "params"):
        change = sum(
            getattr(layer, kind)[p] - getattr(layer, kind)[0]
            for layer, p in zip(layers, picks, strict=True)
        )
        plan.totals[f"{kind}_after"] = plan.totals[f"{kind}_before"] + change


def _chart(frontier: Frontier, x_of: Any) -> list[tuple[float, float]]:
    """Up to ``CHART_POINTS`` frontier points, evenly spread, as (x, loss)."""
    step = max(1, math.ceil(len(frontier) / CHART_POINTS))
    keep = [*range(0, len(frontier), step), len(frontier) - 1]
    return [
        (float(x_of(float(frontier.cost[i]))), float(frontier.loss[i])) for i in sorted(set(keep))
    ]


def _original_totals(model: nn.Module, args: tuple[Any, ...]) -> dict[str, int]:
    """The original's MACs (fvcore, BatchNorm included, as ``report`` counts) and parameters."""
    counting_copy = copy.deepcopy(model).eval()
    try:
        macs = counting.fvcore_count(counting_copy, args).total
    except Exception:  # fvcore cannot trace it: report falls back to FlopCounterMode too
        macs = counting.flop_counter_count(counting_copy, args).total
    return {"macs_before": int(macs), "params_before": counting.count_params(counting_copy)[""]}


def _losses(model: nn.Module, layers: list[LayerOptions], calibration: Calibration | None) -> str:
    """Fill every layer's ``loss`` (unweighted); returns where they came from."""
    if calibration is None:
        _data_free(layers)
        return "data-free"
    dw_size = max(c.dw_size for layer in layers for c in layer.choices if not c.keep)
    # Layers too wide for the pair sums (as LayerStatistics refuses them): data-free losses.
    taps = lambda layer: dw_size ** len(layer.module.kernel_size) + 1  # noqa: E731
    wide = [layer for layer in layers if layer.module.out_channels**2 * taps(layer) > MAX_PAIR_SUMS]
    narrow = [layer for layer in layers if layer not in wide]
    sums = layer_statistics(model, [layer.name for layer in narrow], calibration, dw_size=dw_size)
    for layer in narrow:
        channel_weights = None
        if calibration.weight_by_batchnorm:
            channel_weights = _channel_weights(following_batchnorm(model, layer.site))
        layer.loss = statistics_losses(
            sums[layer.name], layer.module, layer.choices, channel_weights
        )
    _data_free(wide)
    return "calibration" if not wide else f"calibration ({len(wide)} wide layers data-free)"


def _channel_weights(batchnorm: nn.Module | None) -> torch.Tensor | None:
    if batchnorm is None or getattr(batchnorm, "running_var", None) is None:
        return None
    scale = 1.0 / (batchnorm.running_var.double() + batchnorm.eps)
    if batchnorm.weight is not None:
        scale = scale * batchnorm.weight.detach().double().square()
    return scale


def _data_free(layers: list[LayerOptions]) -> None:
    """Data-free losses of every layer, side by side in worker threads (one core each)."""
    workers = max(2, torch.get_num_threads())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(workers) as pool:
            results = list(
                pool.map(lambda layer: data_free_losses(layer.module, layer.choices), layers)
            )
    finally:
        torch.set_num_threads(threads)
    for layer, losses in zip(layers, results, strict=True):
        layer.loss = losses


def _weights(
    kind: str, model: nn.Module, layers: list[LayerOptions], args: tuple
) -> dict[str, float]:
    sites = [layer.site for layer in layers]
    if kind == "probe":
        return probe_weights(model, sites, args)
    if kind == "batchnorm":
        return batchnorm_weights(model, sites)
    return {site.name: 1.0 for site in sites}


def _probe_inputs(args: tuple[Any, ...], calibration: Calibration | None) -> tuple[Any, ...]:
    """The sensitivity probe's inputs: up to ``PROBE_SAMPLES`` real inputs of the calibration
    data where there is some (a gradient on one example image is a noisy estimate), else the
    example inputs."""
    if calibration is None or calibration.batches is None:
        return args
    first = calibration.batches.first[0]
    device = calibration.batches.device
    first = first if device is None else first.to(device)
    return (first[:PROBE_SAMPLES],)


def _calibration(model: nn.Module, data: Any) -> Calibration | None:
    if data is None:
        return None
    if isinstance(data, Calibration) and data.batches is not None:
        return data
    return prepare(model, data, None, None)


def _batched(args: tuple[Any, ...], batch_size: int | None) -> tuple[Any, ...]:
    """``args`` with every tensor's first dimension made ``batch_size`` (rows repeated)."""
    if batch_size is None:
        return args
    resized = []
    for arg in args:
        if isinstance(arg, torch.Tensor) and arg.dim() > 0 and arg.shape[0] != batch_size:
            arg = arg[torch.arange(batch_size) % arg.shape[0]]
        resized.append(arg)
    if not any(isinstance(a, torch.Tensor) and a.dim() > 0 for a in args):
        raise ConfigError(
            f"Budget(batch_size={batch_size}) needs tensor example_inputs with a batch "
            f"dimension; got {describe_args(args)}"
        )
    return tuple(resized)


def _batch(args: tuple[Any, ...]) -> int | None:
    return next((a.shape[0] for a in args if isinstance(a, torch.Tensor) and a.dim() > 0), None)


def _layout(model: nn.Module) -> str:
    from ..deploy import deploy_record

    record = deploy_record(model)
    return record.memory_format if record is not None else "contiguous"


@contextmanager
def _stage(seconds: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start
