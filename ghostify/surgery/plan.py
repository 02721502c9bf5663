"""Conversion plans: the JSON view of a conversion record, and rebuilding from one.

``plan_of(model)`` is plain data (JSON-able); ``convert(fresh_model, plan=plan)`` rebuilds the same
architecture, without fitting (the weights come from the saved state_dict), and refuses a plan
that does not describe the model's convolutions exactly.
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from ..errors import PlanError
from ..layers.conv_types import TORCH_CONVS, conv_class, qualified_name
from ..layers.ghost_module import GhostModule, conv_config
from ..options import check_dw_size, check_ratio, intrinsic_count
from .record import ConversionRecord, record_of
from .selection import no_match_message

SCHEMA = "ghostify.plan/2"
_LAYER_KEYS = ("name", "conv", "ratio", "dw_size")
CHANNEL_ORDERS = ("identity", "folded", "gathered", "kept")


def plan_of(model: nn.Module) -> dict[str, Any]:
    """JSON-serialisable record of what ``convert`` did to ``model``.

    ``layers`` lists every GhostModule in the model (name, original layer class and configuration,
    ratio, dw_size, how discovery found it, what became of its channel order); ``skipped`` every
    convolution left as it was, with the reason; ``options`` the arguments of the conversion;
    ``converted_dims`` the spatial dimensions of the converted layers (2 for Conv2d).
    ``convert(fresh_model, plan=plan)`` rebuilds the same architecture.
    """
    if not isinstance(model, nn.Module):
        raise PlanError(f"plan_of needs a torch.nn.Module; got {type(model).__name__}")
    record = record_of(model) or ConversionRecord([], [], {})
    rows = {row.name: row for row in record.layers}
    layers = []
    seen: set[int] = set()
    for name, module in model.named_modules():
        if isinstance(module, GhostModule) and id(module) not in seen:
            seen.add(id(module))
            layers.append(_layer_row(name, module, rows.get(name)))
    if record_of(model) is not None:
        skipped = [row.to_plan() for row in record.skipped]
    else:
        skipped = [
            {"name": name, "reason": "not converted (no conversion record on this model)"}
            for name, module in model.named_modules()
            if isinstance(module, tuple(TORCH_CONVS)) and not _inside_ghost(model, name)
        ]
    converted_dims = sorted({len(row["conv"]["kernel_size"]) for row in layers})
    return {
        "schema": SCHEMA,
        "layers": layers,
        "skipped": skipped,
        "options": record.options,
        "converted_dims": converted_dims,
    }


def _layer_row(name: str, module: GhostModule, row: Any) -> dict[str, Any]:
    if row is not None:
        entry = row.to_plan()
    else:  # a GhostModule the record does not know (built by hand, or the record was lost)
        entry = {
            "name": name,
            "type": None,
            "conv": module.conv_config(),
            "found_by": None,
            "folded_into": [],
        }
    recorded = entry.get("channel_order")
    if module.channel_order is None:
        order = "folded" if recorded == "folded" else "identity"
    else:
        order = "gathered" if recorded == "gathered" else "kept"
    entry.update(
        ratio=module.ratio,
        dw_size=module.dw_size,
        intrinsic_channels=module.intrinsic_channels,
        channel_order=order,
    )
    return entry


def _inside_ghost(model: nn.Module, name: str) -> bool:
    parts = name.split(".")
    return any(
        isinstance(model.get_submodule(".".join(parts[:i])), GhostModule)
        for i in range(1, len(parts))
    )


def check_plan(plan: object) -> list[dict[str, Any]]:
    """The plan's layer rows, after checking the plan is one ``plan_of`` could have written."""
    if not isinstance(plan, dict) or not isinstance(plan.get("layers"), list):
        raise PlanError(
            f"plan must be the dict returned by ghostify.plan_of (schema {SCHEMA!r}); "
            f"got {type(plan).__name__}"
        )
    if plan.get("schema") != SCHEMA:
        raise PlanError(
            f"plan schema {plan.get('schema')!r} is not supported; expected {SCHEMA!r} (plans of "
            "ghostify.plan/1 describe the older GhostModule layout: convert the model again)"
        )
    for row in plan["layers"]:
        if not isinstance(row, dict) or any(key not in row for key in _LAYER_KEYS):
            raise PlanError(f"plan layer rows need the keys {_LAYER_KEYS}; got {row!r}")
        check_ratio(row["ratio"], f"plan layer {row['name']!r} ratio")
        check_dw_size(row["dw_size"], f"plan layer {row['name']!r} dw_size")
        if row.get("channel_order", "identity") not in CHANNEL_ORDERS:
            raise PlanError(
                f"plan layer {row['name']!r} channel_order must be one of {CHANNEL_ORDERS}; "
                f"got {row.get('channel_order')!r}"
            )
    return plan["layers"]


def check_plan_fits(model: nn.Module, plan: dict[str, Any], conv_names: list[str]) -> None:
    """Every conv of ``model`` must be in the plan (converted or skipped), and vice versa."""
    planned = {row["name"] for row in plan["layers"]}
    planned |= {row["name"] for row in plan.get("skipped", []) if isinstance(row, dict)}
    unplanned = [name for name in conv_names if name not in planned]
    if unplanned:
        raise PlanError(
            f"the model has {len(unplanned)} convolution(s) the plan does not mention "
            f"({_listing(unplanned)}): the plan was made for another model"
        )
    for entry in plan["layers"]:
        check_layer_fits(model, entry, conv_names)


def check_layer_fits(model: nn.Module, entry: dict[str, Any], conv_names: list[str]) -> nn.Module:
    """The conv ``entry`` names, after checking it exists and has the recorded configuration."""
    name = entry["name"]
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise PlanError(
            no_match_message("plan layer", name, conv_names)
            + "; the plan was made for another model"
        ) from None
    if isinstance(module, GhostModule):
        raise PlanError(f"plan layer {name!r} is already a GhostModule in this model")
    if not isinstance(module, tuple(TORCH_CONVS)):
        raise PlanError(f"plan layer {name!r} is a {type(module).__name__}, not a convolution")
    recorded, actual_type = entry.get("type"), qualified_name(conv_class(module))
    if recorded is not None and recorded != actual_type:
        raise PlanError(
            f"plan layer {name!r} was a {recorded}; this model's layer is a {actual_type}"
        )
    actual = conv_config(module)
    if actual != entry["conv"]:
        differences = ", ".join(
            f"{key}: plan {entry['conv'].get(key)!r}, model {actual[key]!r}"
            for key in actual
            if entry["conv"].get(key) != actual[key]
        )
        raise PlanError(f"plan layer {name!r} does not fit the model ({differences})")
    _check_intrinsic(entry, actual)
    return module


def _check_intrinsic(entry: dict[str, Any], conv: dict[str, Any]) -> None:
    """The layer's kept-filter count, as the plan recorded it (plans from earlier releases do
    not), must be the one this release builds."""
    out, groups, ratio = conv["out_channels"], conv["groups"], entry["ratio"]
    built = intrinsic_count(out, ratio, groups)
    recorded = entry.get("intrinsic_channels")
    if recorded is None:
        # Releases before the plans recorded it rounded a grouped layer's count up to a
        # multiple of the groups only, which made some ghosts from other groups' filters.
        recorded = math.ceil(math.ceil(out / ratio) / groups) * groups
        if recorded != built:
            raise PlanError(
                f"plan layer {entry['name']!r} was made by an earlier ghostify, whose layout for "
                f"this grouped layer (groups={groups}, ratio={ratio}) made some ghost channels "
                "from other groups' inputs; it cannot be rebuilt: convert the original model "
                "again"
            )
    elif recorded != built:
        raise PlanError(
            f"plan layer {entry['name']!r} records {recorded!r} intrinsic channels; "
            f"out_channels={out} at ratio={ratio} with groups={groups} gives {built}"
        )


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:5])
    return shown + (f", ... {len(names) - 5} more" if len(names) > 5 else "")
