"""Conversion plans: a JSON-able record of what was converted, how, and what was skipped why."""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from .errors import PlanError
from .ghost_module import GhostModule
from .options import check_dw_size, check_ratio

SCHEMA = "ghostify.plan/1"
# The record of the last conversion, kept on the converted model's root module.
PLAN_ATTR = "_ghostify_plan"
_LAYER_KEYS = ("name", "conv", "ratio", "dw_size")


def layer_entry(name: str, module: GhostModule, found_by: str | None = None) -> dict[str, Any]:
    """One plan row: the layer's name, original conv configuration and ghost settings."""
    return {
        "name": name,
        "conv": module.conv_config(),
        "ratio": module.ratio,
        "dw_size": module.dw_size,
        "found_by": found_by,
    }


def plan_of(model: nn.Module) -> dict[str, Any]:
    """JSON-serialisable record of what ``convert`` did to ``model``.

    ``layers`` lists every GhostModule in the model (name, original conv configuration, ratio,
    dw_size, how discovery found it); ``skipped`` every convolution left as it was, with the
    reason; ``options`` the arguments of the conversion. ``convert(fresh_model, plan=plan)``
    rebuilds the same architecture.
    """
    if not isinstance(model, nn.Module):
        raise PlanError(f"plan_of needs a torch.nn.Module; got {type(model).__name__}")
    record = getattr(model, PLAN_ATTR, None) or {}
    found_by = {row["name"]: row.get("found_by") for row in record.get("layers", [])}
    layers = []
    seen: set[int] = set()
    for name, module in model.named_modules():
        if isinstance(module, GhostModule) and id(module) not in seen:
            seen.add(id(module))
            layers.append(layer_entry(name, module, found_by.get(name)))
    if "skipped" in record:
        skipped = copy.deepcopy(record["skipped"])
    else:
        skipped = [
            {"name": name, "reason": "not converted (no conversion record on this model)"}
            for name, module in model.named_modules()
            if type(module) is nn.Conv2d and not _inside_ghost(model, name)
        ]
    return {
        "schema": SCHEMA,
        "layers": layers,
        "skipped": skipped,
        "options": copy.deepcopy(record.get("options", {})),
    }


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
    if plan.get("schema", SCHEMA) != SCHEMA:
        raise PlanError(f"plan schema {plan.get('schema')!r} is not supported; expected {SCHEMA!r}")
    for row in plan["layers"]:
        if not isinstance(row, dict) or any(key not in row for key in _LAYER_KEYS):
            raise PlanError(f"plan layer rows need the keys {_LAYER_KEYS}; got {row!r}")
        check_ratio(row["ratio"], f"plan layer {row['name']!r} ratio")
        check_dw_size(row["dw_size"], f"plan layer {row['name']!r} dw_size")
    return plan["layers"]
