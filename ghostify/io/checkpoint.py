"""Converted checkpoints: a state_dict plus everything needed to rebuild the architecture.

The file is a plain dict written by ``torch.save``; it holds only tensors, strings, numbers,
lists and dicts, so ``torch.load(path, weights_only=True)`` reads it without unpickling any
object. ``load_model`` rebuilds the model from its SPEC, re-applies the saved plan with
``convert(model, plan=plan)`` and loads the weights strictly.
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
VERSION = 1
_KEYS = ("format", "version", "spec", "plan", "state_dict")


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    *,
    spec: str,
    plan: dict[str, Any],
    input_shape: list[int] | tuple[int, ...] | None = None,
) -> Path:
    """Write ``model``'s weights with its SPEC and conversion plan to ``path``."""
    plan = plain_data(plan, "the conversion plan")  # or weights_only loading would fail
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "spec": spec,
        "plan": plan,
        "state_dict": {key: value.detach().cpu() for key, value in model.state_dict().items()},
        "input_shape": None if input_shape is None else [int(n) for n in input_shape],
        "ghostify_version": package_version("ghostify"),
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
    if payload["version"] != VERSION:
        raise GhostifyError(
            f"ghostify checkpoint {str(path)!r} has version {payload['version']!r}; this ghostify "
            f"reads version {VERSION}"
        )
    return payload


def load_model(payload: dict[str, Any]) -> nn.Module:
    """Rebuild the converted model a loaded checkpoint describes, with its weights, in eval()."""
    model = build_model(payload["spec"])
    convert(model, plan=payload["plan"])  # no fit: the weights come from the state_dict
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as error:
        raise GhostifyError(
            f"the checkpoint's weights do not fit {payload['spec']!r} converted with its plan "
            f"({first_line(error)}); was the model definition changed since the checkpoint was "
            "written?"
        ) from None
    return model.eval()
