"""Converted checkpoints: a state_dict plus everything needed to rebuild the architecture.

The file is a plain dict written by ``torch.save``; it holds only tensors, strings, numbers,
lists and dicts, so ``torch.load(path, weights_only=True)`` reads it without unpickling any
object. ``load_model`` rebuilds the model from its SPEC, re-applies the saved plan with
``convert(model, plan=plan)`` and loads the weights strictly.

A *deployed* checkpoint (``ghostify deploy --out``, version 2) holds the weights of the model in
its inference form, BatchNorms folded, and what ``ghostify.deploy`` did: ``load_model`` rebuilds
the converted model, deploys it again to get the same structure, and loads the deployed weights.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, GhostifyError
from ..surgery.convert import convert
from ..utils import first_line, package_version, plain_data
from .specs import build_model

FORMAT = "ghostify.checkpoint"
VERSION = 1  # a converted model
DEPLOYED_VERSION = 2  # a deployed model: an older ghostify refuses it by its version
_KEYS = ("format", "version", "spec", "plan", "state_dict")


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    *,
    spec: str,
    plan: dict[str, Any],
    input_shape: list[int] | tuple[int, ...] | None = None,
    deployed: Any = None,
) -> Path:
    """Write ``model``'s weights with its SPEC and conversion plan to ``path``.

    ``deployed``: the ``DeployRecord`` of a model ``ghostify.deploy`` has turned into its
    inference form (``deploy_record(model)``), which makes this a deployed checkpoint.
    """
    plan = plain_data(plan, "the conversion plan")  # or weights_only loading would fail
    payload = {
        "format": FORMAT,
        "version": VERSION if deployed is None else DEPLOYED_VERSION,
        "spec": spec,
        "plan": plan,
        "state_dict": {key: value.detach().cpu() for key, value in model.state_dict().items()},
        "input_shape": None if input_shape is None else [int(n) for n in input_shape],
        "ghostify_version": package_version("ghostify"),
    }
    if deployed is not None:
        payload["deployed"] = {
            "folds": [[f.batchnorm, f.into, f.reason] for f in deployed.folds],
            "fused_internal": list(deployed.fused_internal),
            "memory_format": deployed.memory_format,
            "joins": {name: choice.join for name, choice in deployed.joins.items()},
            "pointwise_cheap": list(deployed.pointwise_cheap),
        }
    path = Path(path)
    torch.save(payload, path)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read and validate a ghostify checkpoint (``weights_only=True``: nothing is unpickled)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint {str(path)!r} does not exist or is not a file")
    if not zipfile.is_zipfile(path):
        raise GhostifyError(
            f"{str(path)!r} is not a ghostify checkpoint (not a file written by torch.save; "
            "write one with `ghostify convert ... --out FILE`)"
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise GhostifyError(
            f"{str(path)!r} is not a ghostify checkpoint: it holds Python objects other than "
            "tensors and plain data, and ghostify never unpickles those (weights_only=True)"
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError) as error:
        raise GhostifyError(
            f"{str(path)!r} is not a readable ghostify checkpoint ({first_line(error)})"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise GhostifyError(
            f"{str(path)!r} is not a ghostify checkpoint (expected a dict with "
            f"format={FORMAT!r}; write one with `ghostify convert ... --out FILE`)"
        )
    missing = [key for key in _KEYS if key not in payload]
    if missing:
        raise GhostifyError(f"ghostify checkpoint {str(path)!r} lacks {', '.join(missing)}")
    if payload["version"] not in (VERSION, DEPLOYED_VERSION):
        raise GhostifyError(
            f"ghostify checkpoint {str(path)!r} has version {payload['version']!r}; this ghostify "
            f"reads versions {VERSION} (converted) and {DEPLOYED_VERSION} (deployed)"
        )
    return payload


def load_model(payload: dict[str, Any]) -> nn.Module:
    """Rebuild the (converted or deployed) model a loaded checkpoint describes, with its
    weights, in eval(): ``load_model(load_checkpoint(path))``."""
    model = build_model(payload["spec"])
    convert(model, plan=payload["plan"])  # no fit: the weights come from the state_dict
    if payload.get("deployed") is not None:
        _redeploy(model.eval(), payload["deployed"], payload["spec"])
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as error:
        raise GhostifyError(
            f"the checkpoint's weights do not fit {payload['spec']!r} converted with its plan "
            f"({first_line(error)}); was the model definition changed since the checkpoint was "
            "written?"
        ) from None
    deployed = payload.get("deployed")
    for name, join in (deployed or {}).get("joins", {}).items():  # each GhostModule's, as chosen
        model.get_submodule(name).join = join
    if deployed is not None and deployed["memory_format"] == "channels_last":
        video = any(parameter.dim() == 5 for parameter in model.parameters())
        model.to(memory_format=torch.channels_last_3d if video else torch.channels_last)
    return model.eval()


def _redeploy(model: nn.Module, saved: dict[str, Any], spec: str) -> None:
    """Give the rebuilt model the deployed structure the checkpoint's weights were saved from."""
    from ..deploy import deploy, deploy_record  # deployment builds on checkpoints' models
    from ..layers.ghost_fold import make_cheap_pointwise

    for name in saved.get("pointwise_cheap", []):  # the structure the weights were saved in
        make_cheap_pointwise(model.get_submodule(name))
    # The rebuilt weights are not the saved ones yet: nothing is decided from their values.
    deploy(model, check=False, memory_format="contiguous", pointwise_cheap=False)
    folds = [[f.batchnorm, f.into, f.reason] for f in deploy_record(model).folds]
    if folds != saved["folds"]:
        differ = [fold for fold in saved["folds"] if fold not in folds]
        raise GhostifyError(
            f"the deployed checkpoint of {spec!r} folded its BatchNorms otherwise than deploying "
            f"the rebuilt model does (e.g. {differ[:1] or folds[:1]}); was the model definition "
            "changed since the checkpoint was written?"
        )
