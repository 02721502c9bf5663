"""Loading a user's own state_dict into a model built from a SPEC, with errors that name keys."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError
from ..utils import first_line

_SHOWN = 3


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The state_dict saved in ``path``, read with ``weights_only=True`` (nothing unpickled)."""
    try:
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load fails in many ways on a file it cannot read
        raise ConfigError(
            f"cannot read --weights {str(path)!r} as a state_dict saved with torch.save "
            f"(read with weights_only=True, so nothing is unpickled): {first_line(error)}"
        ) from None
    if not isinstance(state, dict) or not all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in state.items()
    ):
        raise ConfigError(
            f"--weights {str(path)!r} holds a {type(state).__name__}, not a state_dict (a dict "
            "of names to tensors, as model.state_dict() gives)"
        )
    return state


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:_SHOWN])
    return shown + (f", ... {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")


def apply_weights(
    model: nn.Module, state: dict[str, torch.Tensor], path: str | Path, spec: str
) -> None:
    """Load ``state`` into ``model`` strictly; a mismatch names missing, unexpected and
    wrongly shaped keys (a few of each) before anything is changed."""
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    shapes = [
        f"{key} (file {tuple(state[key].shape)}, model {tuple(expected[key].shape)})"
        for key in expected
        if key in state and state[key].shape != expected[key].shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_listing(unexpected)}")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es): {_listing(shapes)}")
    if problems:
        hint = ""
        if unexpected and all(key.startswith("module.") for key in unexpected):
            hint = " (the keys start with 'module.': saved from DataParallel/DDP? save "
            hint += "model.module.state_dict() instead)"
        raise ConfigError(
            f"--weights {str(path)!r} does not fit {spec}: {'; '.join(problems)}{hint}"
        )
    model.load_state_dict(state, strict=True)
