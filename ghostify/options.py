"""Validation of the user-facing knobs, shared by GhostModule, convert and the CLI."""

from __future__ import annotations

import math
from typing import Any

from .errors import ConfigError

INIT_MODES = ("weights", "scratch")


def check_ratio(ratio: object, where: str = "ratio") -> int:
    """Return ``ratio`` if it is an int >= 2, else raise a ConfigError naming the value."""
    if isinstance(ratio, bool) or not isinstance(ratio, int) or ratio < 2:
        raise ConfigError(
            f"{where} must be an int >= 2 (1/ratio of the channels are computed by the primary "
            f"convolution); got {ratio!r}"
        )
    return ratio


AUTO_DW_SIZE = "auto"


def check_dw_size(dw_size: object, where: str = "dw_size", *, allow_auto: bool = False) -> Any:
    """Return ``dw_size`` if it is an odd int >= 1 (or ``"auto"`` where allowed), else raise a
    ConfigError naming the value."""
    if allow_auto and dw_size == AUTO_DW_SIZE:
        return dw_size
    if isinstance(dw_size, bool) or not isinstance(dw_size, int) or dw_size < 1 or dw_size % 2 == 0:
        auto = " or 'auto'" if allow_auto else ""
        raise ConfigError(
            f"{where} must be an odd int >= 1{auto} (the cheap depthwise kernel needs a centre "
            f"so that 'same' padding keeps the spatial size); got {dw_size!r}"
        )
    return dw_size


def resolve_dw_size(dw_size: int | str, kernel_size: tuple[int, ...]) -> int:
    """The cheap kernel size for a conv of ``kernel_size``: ``"auto"`` is 1 for a pointwise
    (1x1) conv, whose data-free fit can only use the cheap kernel's centre tap anyway, and 3
    otherwise; an int is itself."""
    if dw_size != AUTO_DW_SIZE:
        return int(dw_size)
    return 1 if all(k == 1 for k in kernel_size) else 3


def check_init(init: object) -> str:
    """Return ``init`` if it names a known initialisation, else raise a ConfigError."""
    if init not in INIT_MODES:
        raise ConfigError(f"init must be one of {INIT_MODES}; got {init!r}")
    return init  # type: ignore[return-value]


def intrinsic_count(out_channels: int, ratio: int, groups: int) -> int:
    """Intrinsic channels for a layer: ceil(out / ratio), rounded up to a multiple of ``groups``.

    The primary convolution keeps the original grouping, and a grouped convolution needs its output
    channel count to be a multiple of the group count.
    """
    base = math.ceil(out_channels / ratio)
    return math.ceil(base / groups) * groups
