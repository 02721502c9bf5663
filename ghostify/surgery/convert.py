"""The conversion pass: discover → select → build → check → swap → record."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, ConversionError
from ..inputs import as_args, describe_args, eval_mode
from ..layers.conv_types import conv_class, conv_dims, qualified_name
from ..layers.ghost_module import GhostModule
from ..options import check_dw_size, check_init, check_ratio
from ..progress import bar, check_progress
from ..trained import warn_if_trained
from ..utils import describe_error
from .build import build_layers, check_shapes
from .channel_order import fold_channel_orders
from .discovery import ConvSite, Discovery, discover
from .latency import time_layer
from .plan import check_plan, check_plan_fits
from .record import (
    RECORD_ATTR,
    ConversionRecord,
    ConvertedLayer,
    LayerSettings,
    SkippedConv,
)
from .selection import (
    ALL_DIMS,
    Selection,
    check_dims,
    check_overrides,
    check_patterns,
    check_subclasses,
)
from .swap import transaction

# Arguments a plan fixes; passing another value beside plan= is a conflict, not a preference.
_PLAN_FIXES = {
    "ratio": 2,
    "dw_size": 3,
    "include": None,
    "exclude": None,
    "overrides": None,
    "skip_stem": True,
    "allow_subclasses": False,
    "only_faster": False,
    "dims": ALL_DIMS,
}


def convert(
    model: nn.Module,
    *,
    ratio: int = 2,
    dw_size: int | str = 3,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    overrides: dict[str, dict[str, int]] | None = None,
    init: str | None = None,
    example_inputs: Any = None,
    plan: dict[str, Any] | None = None,
    skip_stem: bool = True,
    allow_subclasses: bool | Sequence[type] = False,
    fold_channel_order: bool = True,
    keep_originals: bool = True,
    only_faster: bool = False,
    progress: bool | None = None,
    dims: Sequence[int] = ALL_DIMS,
    calibration_data: Any = None,
) -> nn.Module:
    """Rewrite ``model``'s convolutions as GhostModules, in place, and return ``model``.

    Every convolution is either converted or recorded as skipped with a reason (see
    ``plan_of``). The pass is atomic: if anything fails, ``model`` is left exactly as it was.
    With ``plan``, the layers and settings recorded by ``plan_of`` are rebuilt instead, without
    fitting (the weights come from the saved state_dict), so a saved state_dict of the converted
    model loads into the result. ``only_faster=True`` (needs ``example_inputs``) times every
    candidate layer against its GhostModule on the input it sees and keeps the convolutions whose
    ghost form is not faster on this machine. ``dims`` names the convolutions converted by their
    spatial dimensions: Conv1d, Conv2d and Conv3d by default (``dims=(2,)`` for Conv2d only).
    ``progress``: tqdm bars on stderr for discovery, fitting and checks; None shows them only in
    a terminal outside pytest, False never, True always. With ``calibration_data`` (a few hundred
    unlabeled inputs: a tensor, a list of batches, a DataLoader, or a ``ghostify.Calibration``
    with settings), the new layers are then fitted on real data (see ``ghostify.tune.calibrate``),
    atomically too.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    progress = check_progress(progress)
    args = None if example_inputs is None else as_args(example_inputs)
    calibration = _calibration(model, calibration_data, init, plan)
    if plan is not None:
        given = {
            "ratio": ratio,
            "dw_size": dw_size,
            "include": include,
            "exclude": exclude,
            "overrides": overrides,
            "skip_stem": skip_stem,
            "allow_subclasses": allow_subclasses,
            "only_faster": only_faster,
            "dims": tuple(dims) if isinstance(dims, Sequence) else dims,
        }
        _check_plan_arguments(given)
        if init is not None and check_init(init) == "weights" and calibration is None:
            warn_if_trained(model)  # data-free on trained weights loses what they learnt
        return _rebuild(
            model, plan, args, init, fold_channel_order, keep_originals, progress, calibration
        )
    check_ratio(ratio)
    check_dw_size(dw_size, allow_auto=True)
    fitted = check_init(init or "weights") == "weights"
    if only_faster and args is None:
        raise ConfigError(
            "only_faster=True needs example_inputs: each layer is timed on the input it sees"
        )
    if fitted and calibration is None:
        warn_if_trained(model)  # data-free on trained weights loses what they learnt
    module_names = [name for name, _ in model.named_modules() if name]
    selection = Selection(
        ratio=ratio,
        dw_size=dw_size,
        include=check_patterns(include, "include", module_names),
        exclude=check_patterns(exclude, "exclude", module_names),
        overrides=check_overrides(overrides, module_names),
        subclasses=check_subclasses(allow_subclasses),
        dims=check_dims(dims),
        skip_stem=skip_stem,
    )
    options = _options(selection, init or "weights", fold_channel_order)
    options["only_faster"] = only_faster

    found = _discover(model, args, progress)
    selection = _with_stem(selection, found)
    chosen, skipped = _select(found, selection, only_faster)
    layers = {site.name: selection.settings_for(site.name, site.module) for site in chosen}
    record = ConversionRecord([], skipped, options, found.graphs)
    _apply(
        model,
        found,
        layers,
        record,
        args,
        fitted,
        fold_channel_order,
        keep_originals,
        progress,
        calibration,
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
    calibration: Any = None,
) -> None:
    """Build, check and swap in a GhostModule for each of ``layers``; then record it all."""
    verb = "fitting" if fitted else "building"
    with bar(len(layers), f"{verb} GhostModules", progress, unit="layer") as layer_bar:

        def on_layer(name: str) -> None:
            layer_bar.set_postfix_str(name, refresh=False)
            layer_bar.update(1)

        replacements = build_layers(model, layers, fitted, on_layer)
    sites = {site.name: site for site in found.sites}
    checks = bar(len(replacements) + 1, "checking", progress if args is not None else False)
    with checks, transaction(model) as changes:
        if args is not None:
            check_shapes(replacements, sites, checks.update)
        originals = {name: changes.replace_name(name, new) for name, new in replacements.items()}
        if calibration is not None:  # fitted on real data before channel orders are folded
            record.calibrated_from = _calibrate(
                calibration, model, replacements, originals, found.graphs, changes
            )
        folded = fold_channel_orders(model, replacements, found.graphs, changes) if fold else {}
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
            channel_order=_order_state(module, name in folded),
            folded_into=folded.get(name, []),
            original=originals[name] if keep_originals else None,
            conv_type=qualified_name(conv_class(originals[name])),
        )
        for name, module in replacements.items()
    ]
    # A plain attribute (not a submodule): the record is not part of the state_dict.
    model.__dict__[RECORD_ATTR] = record


def _calibration(model: nn.Module, data: Any, init: str | None, plan: object) -> Any:
    if data is None:
        return None
    from ..tune.calibrate import prepare  # the tuning stage builds on surgery, not the reverse

    return prepare(model, data, init, plan)


def _calibrate(calibration: Any, model: nn.Module, *layers: Any) -> dict[str, torch.Tensor]:
    from ..tune.calibrate import calibrate_conversion

    return calibrate_conversion(calibration, model, *layers)


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


def _with_stem(selection: Selection, found: Discovery) -> Selection:
    """The stem is the first convolution seen running (unknown when nothing ran)."""
    first = found.sites[0] if found.sites else None
    stem = first.name if first is not None and first.order is not None else None
    return Selection(**{**selection.__dict__, "stem": stem})


def _select(
    found: Discovery, selection: Selection, only_faster: bool
) -> tuple[list, list[SkippedConv]]:
    chosen, skipped = [], []
    for site in found.sites:
        reason = selection.skip_reason(site)
        if reason is None and only_faster:
            reason = _slower_reason(site, selection.settings_for(site.name, site.module))
        if reason is None:
            chosen.append(site)
        else:
            skipped.append(SkippedConv(site.name, reason, site.found_by))
    return chosen, skipped


def _slower_reason(site: ConvSite, settings: LayerSettings) -> str | None:
    """Why the ghost form of ``site`` is kept out: it is not faster on this machine."""
    if not site.input_shapes:
        return None  # never seen running: nothing to time it on
    ghost = GhostModule.like(site.module, ratio=settings.ratio, dw_size=settings.dw_size)
    timing = time_layer(site.module, ghost, site.input_shapes[0])
    if timing.speedup > 1.0:
        return None
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


def _order_state(module: GhostModule, folded: bool) -> str:
    if folded:
        return "folded"
    return "kept" if module.channel_order is not None else "identity"


def _names_by_module(model: nn.Module) -> dict[int, list[str]]:
    """Every name of every module (a shared module has several), sorted."""
    names: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
    return {key: sorted(value) for key, value in names.items()}


def _options(selection: Selection, init: str, fold: bool) -> dict[str, Any]:
    subclasses = selection.subclasses
    return {
        "ratio": selection.ratio,
        "dw_size": selection.dw_size,
        "include": list(selection.include) if selection.include else None,
        "exclude": list(selection.exclude) if selection.exclude else None,
        "overrides": selection.overrides,
        "init": init,
        "skip_stem": selection.skip_stem,
        "allow_subclasses": [c.__qualname__ for c in subclasses]
        if isinstance(subclasses, tuple)
        else subclasses,
        "fold_channel_order": fold,
        "dims": list(selection.dims),
    }


def _check_plan_arguments(given: dict[str, Any]) -> None:
    conflicts = [
        f"{key}={given[key]!r}" for key, default in _PLAN_FIXES.items() if given[key] != default
    ]
    if conflicts:
        raise ConfigError(
            f"plan= fixes every layer and its settings, so {', '.join(conflicts)} cannot be "
            "combined with it; convert without plan= to choose settings, or edit the plan"
        )


def _rebuild(
    model: nn.Module,
    plan: dict[str, Any],
    args: tuple[Any, ...] | None,
    init: str | None,
    fold: bool,
    keep_originals: bool,
    progress: bool | None,
    calibration: Any = None,
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
        calibration,
    )
    if not fitted:  # the saved state_dict brings the channel orders (see GhostModule)
        for row, entry in zip(record.layers, entries, strict=True):
            row.channel_order = entry.get("channel_order", "identity")
    return model
