"""Which layers to convert, and with which settings: include/exclude patterns and overrides.

Patterns are shell-style globs (``fnmatch``) over qualified module names, as
``model.named_modules()`` prints them. A pattern selects a convolution when it matches the
convolution's name or the name of any module that contains it, so ``"layer4"`` and
``"layer4.*"`` both select every convolution inside ``layer4``.

Settings precedence for a layer, lowest to highest: the global ``ratio`` / ``dw_size``; then
``overrides`` entries whose glob matches the layer, in the order given (a later one wins); then an
``overrides`` key equal to the layer's exact name.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping, Sequence
from fnmatch import fnmatchcase
from typing import Any

from .errors import ConfigError
from .options import check_dw_size, check_ratio

OVERRIDE_KEYS = ("ratio", "dw_size")


def _scopes(name: str) -> list[str]:
    """``"a.b.c"`` -> ``["a", "a.b", "a.b.c"]``: the layer and every module containing it."""
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def matches(pattern: str, name: str) -> bool:
    """True when ``pattern`` matches ``name`` or one of the modules that contain it."""
    return any(fnmatchcase(scope, pattern) for scope in _scopes(name))


def check_patterns(
    patterns: object, argument: str, module_names: Sequence[str]
) -> tuple[str, ...] | None:
    """Validate a list of patterns; each must match at least one module of the model."""
    if patterns is None:
        return None
    if isinstance(patterns, str):
        patterns = [patterns]
    if not isinstance(patterns, Iterable) or not all(isinstance(p, str) for p in patterns):
        raise ConfigError(f"{argument} must be a list of name patterns (str); got {patterns!r}")
    patterns = tuple(patterns)
    for pattern in patterns:
        if not any(matches(pattern, name) for name in module_names):
            raise ConfigError(no_match_message(argument, pattern, module_names))
    return patterns


def no_match_message(argument: str, pattern: str, module_names: Sequence[str]) -> str:
    close = difflib.get_close_matches(pattern, module_names, n=5, cutoff=0.5)
    hint = f"; close names: {', '.join(close)}" if close else ""
    return f"{argument} pattern {pattern!r} matches no module of the model{hint}"


def check_overrides(
    overrides: object, module_names: Sequence[str]
) -> dict[str, dict[str, int]] | None:
    """Validate ``{pattern: {"ratio": int, "dw_size": int}}``."""
    if overrides is None:
        return None
    if not isinstance(overrides, Mapping):
        raise ConfigError(
            'overrides must be a dict like {"layer4.*": {"ratio": 4}}; '
            f"got {type(overrides).__name__}"
        )
    checked: dict[str, dict[str, int]] = {}
    for pattern, settings in overrides.items():
        check_patterns([pattern], "overrides", module_names)
        if not isinstance(settings, Mapping) or not set(settings) <= set(OVERRIDE_KEYS):
            raise ConfigError(
                f"overrides[{pattern!r}] must be a dict with keys among {OVERRIDE_KEYS}; "
                f"got {settings!r}"
            )
        where = f"overrides[{pattern!r}]"
        if "ratio" in settings:
            check_ratio(settings["ratio"], f"{where}['ratio']")
        if "dw_size" in settings:
            check_dw_size(settings["dw_size"], f"{where}['dw_size']")
        checked[pattern] = dict(settings)
    return checked


def settings_for(
    name: str, ratio: int, dw_size: int, overrides: Mapping[str, Mapping[str, Any]] | None
) -> dict[str, int]:
    """The ratio and dw_size for layer ``name`` after applying the documented precedence."""
    settings = {"ratio": ratio, "dw_size": dw_size}
    if not overrides:
        return settings
    for pattern, values in overrides.items():
        if pattern != name and matches(pattern, name):
            settings.update(values)
    settings.update(overrides.get(name, {}))
    return settings
