"""The conversion pass: discover → select → build → check → swap → record."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, ConversionError
from ..inputs import as_args, describe_args, eval_mode
from ..layers.conv_types import conv_class, conv_dims, qualified_name
from ..layers.ghost_module import GhostModule
from ..options import check_init
from ..progress import bar, check_progress
from ..utils import describe_error
from .build import build_layers, check_shapes
from .channel_order import fold_channel_orders
from .coupling import find_groups
from .discovery import ConvSite, Discovery, discover
from .graph import TracedGraph
from .latency import time_layer
from .layouts import SHARED, LayoutChoice, plan_layouts, record_sharing, shared_names
from .plan import check_plan, check_plan_fits
from .record import (
    RECORD_ATTR,
    ConversionRecord,
    ConvertedLayer,
    LayerSettings,
    SkippedConv,
)
from .selection import Rules, Selection
from .swap import Transaction, transaction

# What a plan fixes; another value beside plan= is a conflict, not a preference.
_PLAN_FIXES = {"ratio": 2, "dw_size": 3, "only_faster": False}


@dataclass
class Swapped:
    """What a refinement stage (calibration) works on: the new layers, just swapped in.

    It runs inside the conversion's transaction (``changes``), before channel orders are
    folded; a failure there puts every layer back. It returns, by state_dict key, the values
    as they were of the tensors outside the new layers that it changed (the record keeps them
    for ``original_model``).
    """

    model: nn.Module
    layers: dict[str, GhostModule]
    originals: dict[str, nn.Module]
    graphs: list[TracedGraph]
    changes: Transaction
    # Each new layer's layout: shared with its channel group's other writers or its own
    # (``surgery.layouts``). A refinement that decides again on real data updates it here;
    # the record is written from it.
    layouts: dict[str, LayoutChoice] = field(default_factory=dict)

    @property
    def fixed_layouts(self) -> frozenset[str]:
        """Layers sharing one layout with their group: a refinement must keep which channels
        are intrinsic and which slot each ghost takes."""
        return shared_names(self.layouts)

    def shared_sets(self) -> list[list[str]]:
        """The layers sharing one layout, one list per channel group, in the model's order."""
        sets: dict[int | None, list[str]] = {}
        for name in self.layers:
            choice = self.layouts.get(name)
            if choice is not None and choice.layout == SHARED:
                sets.setdefault(choice.group, []).append(name)
        return list(sets.values())


Refine = Callable[[Swapped], dict[str, torch.Tensor]]
# Given a selected convolution and the settings the rules give it: the settings to build it
# with, or the reason it stays as it is (a measured choice: only_faster, a budget).
Choose = Callable[[ConvSite, LayerSettings], "LayerSettings | str"]


def convert(
    model: nn.Module,
    *,
    ratio: int = 2,
    dw_size: int | str = 3,
    select: Selection | None = None,
    init: str | None = None,
    example_inputs: Any = None,
    plan: dict[str, Any] | None = None,
    fold_channel_order: bool = True,
    keep_originals: bool = True,
    only_faster: bool = False,
    progress: bool | None = None,
    refine: Refine | None = None,
    choose: Choose | None = None,
    share_layouts: bool = True,
) -> nn.Module:
    """The conversion pass: rewrite ``model``'s convolutions as GhostModules, in place.

    ``ghostify.convert`` (``ghostify.pipeline``) is the entry point users call; it checks their
    arguments and data, then runs this pass with ``refine`` (calibration, inside the
    transaction) and ``choose`` (a per-layer decision, e.g. a budget's) where asked. Every
    convolution is either converted or recorded as skipped with a reason. Atomic: if anything
    fails, ``model`` is left exactly as it was. With ``plan``, the recorded layers and settings
    are rebuilt instead, without fitting (the weights come from a saved state_dict).
    ``share_layouts``: the GhostModules writing into one residual stream (a channel group,
    ``surgery.coupling``) share one layout where that costs little fit, so the stream runs in
    one order with no gather (``surgery.layouts``).
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    select = Selection() if select is None else select
    if not isinstance(select, Selection):
        raise ConfigError(f"select must be a ghostify.Selection; got {type(select).__name__}")
    progress = check_progress(progress)
    args = None if example_inputs is None else as_args(example_inputs)
    if plan is not None:
        given = {"ratio": ratio, "dw_size": dw_size, "only_faster": only_faster}
        _check_plan_arguments(given, select)
        return _rebuild(
            model, plan, args, init, fold_channel_order, keep_originals, progress, refine
        )
    if not isinstance(share_layouts, bool):
        raise ConfigError(f"share_layouts must be True or False; got {share_layouts!r}")
    rules = select.rules(model, ratio, dw_size)
    fitted = check_init(init or "weights") == "weights"
    if only_faster and args is None:
        raise ConfigError(
            "only_faster=True needs example_inputs: each layer is timed on the input it sees"
        )
    options = _options(rules, init or "weights", fold_channel_order)
    options["only_faster"] = only_faster
    options["share_layouts"] = share_layouts

    found = _discover(model, args, progress)
    rules = _with_stem(rules, found)
    if only_faster:
        choose = _faster_only
    chosen, skipped = _select(found, rules, choose)
    record = ConversionRecord([], skipped, options, found.graphs)
    _apply(
        model,
        found,
        chosen,
        record,
        args,
        fitted,
        fold_channel_order,
        keep_originals,
        progress,
        refine,
        share_layouts,
    )
    return model


def _apply(
    model: nn.Module,
    found: Discovery,
    layers: dict[str, LayerSettings],
    record: ConversionRecord,
    args: tuple[Any, ...] | None,
    fitted: bool,
    fold: bool,
    keep_originals: bool,
    progress: bool | None,
    refine: Refine | None = None,
    share: bool = True,
) -> None:
    """Build, check and swap in a GhostModule for each of ``layers``; then record it all."""
    verb = "fitting" if fitted else "building"
    coupling = find_groups(model, found.graphs, layers)
    sets, layouts = plan_layouts(coupling, layers, share, fitted)
    with bar(len(layers), f"{verb} GhostModules", progress, unit="layer") as layer_bar:

        def on_layer(name: str) -> None:
            layer_bar.set_postfix_str(name, refresh=False)
            layer_bar.update(1)

        replacements, outcomes = build_layers(model, layers, fitted, on_layer, sets)
    record_sharing(sets, outcomes, coupling, layouts)
    sites = {site.name: site for site in found.sites}
    checks = bar(len(replacements) + 1, "checking", progress if args is not None else False)
    with checks, transaction(model) as changes:
        if args is not None:
            check_shapes(replacements, sites, checks.update)
        originals = {name: changes.replace_name(name, new) for name, new in replacements.items()}
        if refine is not None:  # e.g. fitted on real data, before channel orders are folded
            swapped = Swapped(model, replacements, originals, found.graphs, changes, layouts)
            record.calibrated_from = refine(swapped)
        orders = fold_channel_orders(model, replacements, coupling, changes) if fold else {}
        _check_forward(model, args)
        checks.update(1)
    names = _names_by_module(model)
    record.layers = [
        ConvertedLayer(
            name=name,
            conv=module.conv_config(),
            settings=layers[name],
            found_by=sites[name].found_by if name in sites else None,
            aliases=[other for other in names.get(id(module), []) if other != name],
            channel_order=orders[name].state if name in orders else _order_state(module),
            folded_into=orders[name].permutations if name in orders else [],
            original=originals[name] if keep_originals else None,
            conv_type=qualified_name(conv_class(originals[name])),
            output_order=orders[name].output_order if name in orders else None,
            channel_group=layouts[name].group,
            layout=layouts[name].layout,
            layout_reason=layouts[name].reason,
        )
        for name, module in replacements.items()
    ]
    # A plain attribute (not a submodule): the record is not part of the state_dict.
    model.__dict__[RECORD_ATTR] = record


def _discover(model: nn.Module, args: tuple[Any, ...] | None, progress: bool | None) -> Discovery:
    try:
        with bar(1, "discovering convolutions", progress) as step:
            found = discover(model, args)
            step.update(1)
        return found
    except Exception as error:
        raise ConfigError(
            f"the model rejected example_inputs ({describe_args(args or ())}): "
            f"{describe_error(error)}"
        ) from error


def _with_stem(rules: Rules, found: Discovery) -> Rules:
    """The stem is the first convolution seen running (unknown when nothing ran)."""
    first = found.sites[0] if found.sites else None
    stem = first.name if first is not None and first.order is not None else None
    return Rules(**{**rules.__dict__, "stem": stem})


def _select(
    found: Discovery, rules: Rules, choose: Choose | None
) -> tuple[dict[str, LayerSettings], list[SkippedConv]]:
    """Each convolution's settings, or why it stays: the rules first, then ``choose``."""
    chosen: dict[str, LayerSettings] = {}
    skipped: list[SkippedConv] = []
    for site in found.sites:
        reason = rules.skip_reason(site)
        settings = None if reason else rules.settings_for(site.name, site.module)
        if settings is not None and choose is not None:
            decision = choose(site, settings)
            reason, settings = (decision, None) if isinstance(decision, str) else (None, decision)
        if settings is not None:
            chosen[site.name] = settings
        else:
            skipped.append(SkippedConv(site.name, reason, site.found_by))
    return chosen, skipped


def _faster_only(site: ConvSite, settings: LayerSettings) -> LayerSettings | str:
    """``only_faster``: keep the convolution when its ghost form is not faster on this machine."""
    if not site.input_shapes:
        return settings  # never seen running: nothing to time it on
    ghost = GhostModule.like(site.module, ratio=settings.ratio, dw_size=settings.dw_size)
    timing = time_layer(site.module, ghost, site.input_shapes[0])
    if timing.speedup > 1.0:
        return settings
    return (
        f"not faster on this machine (only_faster=True): {timing.ghost_ms:.3f} ms as a "
        f"GhostModule vs {timing.original_ms:.3f} ms as it is, input "
        f"{'x'.join(map(str, site.input_shapes[0]))}"
    )


def _check_forward(model: nn.Module, args: tuple[Any, ...] | None) -> None:
    """With example inputs, the converted model must run; any failure undoes the conversion."""
    if args is None:
        return
    try:
        with eval_mode(model), torch.no_grad():
            model(*args)
    except Exception as error:
        raise ConversionError(
            f"the converted model failed ({describe_error(error)}); "
            "every layer was put back, the model is unchanged"
        ) from error


def _order_state(module: GhostModule) -> str:
    """A layer's order when nothing was folded: its gather's, or the identity."""
    return "kept" if module.channel_order is not None else "identity"


def _names_by_module(model: nn.Module) -> dict[int, list[str]]:
    """Every name of every module (a shared module has several), sorted."""
    names: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
    return {key: sorted(value) for key, value in names.items()}


def _options(rules: Rules, init: str, fold: bool) -> dict[str, Any]:
    subclasses = rules.subclasses
    return {
        "ratio": rules.ratio,
        "dw_size": rules.dw_size,
        "include": list(rules.include) if rules.include else None,
        "exclude": list(rules.exclude) if rules.exclude else None,
        "overrides": rules.overrides,
        "init": init,
        "skip_stem": rules.skip_stem,
        "allow_subclasses": [c.__qualname__ for c in subclasses]
        if isinstance(subclasses, tuple)
        else subclasses,
        "fold_channel_order": fold,
        "dims": list(rules.dims),
    }


def _check_plan_arguments(given: dict[str, Any], select: Selection) -> None:
    conflicts = [
        f"{key}={given[key]!r}" for key, default in _PLAN_FIXES.items() if given[key] != default
    ]
    default = Selection()
    conflicts += [
        f"{key}={getattr(select, key)!r}"
        for key in default.__dataclass_fields__
        if _plain(getattr(select, key)) != _plain(getattr(default, key))
    ]
    if conflicts:
        raise ConfigError(
            f"plan= fixes every layer and its settings, so {', '.join(conflicts)} cannot be "
            "combined with it; convert without plan= to choose settings, or edit the plan"
        )


def _plain(value: Any) -> Any:
    """Sequences compared by their items: ``dims=[1, 2, 3]`` is the default ``(1, 2, 3)``."""
    return tuple(value) if isinstance(value, list | tuple) else value


def _rebuild(
    model: nn.Module,
    plan: dict[str, Any],
    args: tuple[Any, ...] | None,
    init: str | None,
    fold: bool,
    keep_originals: bool,
    progress: bool | None,
    refine: Refine | None = None,
) -> nn.Module:
    """Rebuild the layers a plan records: unfitted (weights come from a state_dict) by default.

    With ``init="weights"`` the plan's layers are fitted and folded like a fresh conversion,
    which applies one model's plan to another trained instance of the same architecture.
    """
    entries = check_plan(plan)
    fitted = init is not None and check_init(init) == "weights"
    found = _discover(model, args, progress)
    # Plans from before Conv1d/Conv3d were converted cover the Conv2d layers only.
    dims = (plan.get("options") or {}).get("dims", [2])
    conv_names = [
        site.name for site in found.sites if site.kind == "conv" and conv_dims(site.module) in dims
    ]
    check_plan_fits(model, plan, conv_names)
    layers = {row["name"]: LayerSettings(row["ratio"], row["dw_size"]) for row in entries}
    skipped = [
        SkippedConv(row["name"], row["reason"], row.get("found_by"))
        for row in plan.get("skipped", [])
    ]
    record = ConversionRecord([], skipped, dict(plan.get("options") or {}), found.graphs)
    _apply(
        model,
        found,
        layers,
        record,
        args,
        fitted,
        fold and fitted,
        keep_originals,
        progress,
        refine,
        bool(record.options.get("share_layouts", True)),
    )
    if not fitted:  # the saved state_dict brings the channel orders (see GhostModule)
        for row, entry in zip(record.layers, entries, strict=True):
            row.channel_order = entry.get("channel_order", "identity")
            if "layout" in entry:
                row.layout = entry["layout"]
                row.layout_reason = "as the plan records it (the state_dict brings the layout)"
    return model
