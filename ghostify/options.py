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
    """Intrinsic channels for a layer: ceil(out / ratio), rounded up so the layout stays exact.

    The primary convolution keeps the original grouping, so each group keeps the same number of
    filters. The cheap convolution makes ``multiplier`` ghosts from every kept filter, in the
    primary's channel order, and a module's surplus slots are the last ones. With one group that
    costs nothing; with several, each group's ghosts must fill its own slots exactly, or the
    surplus would shift later groups' ghosts onto earlier groups' kept filters, which see other
    input channels. So per group the kept count is the smallest divisor of the group's output
    channels that is at least ceil(per_group / ratio); all of them (no ghost) when none smaller
    is, e.g. an odd group width at ratio 2.
    """
    if groups == 1:
        return math.ceil(out_channels / ratio)
    per_group = out_channels // groups
    base = math.ceil(per_group / ratio)
    kept = next(k for k in range(base, per_group + 1) if per_group % k == 0)
    return kept * groups


def no_ghost_reason(out_channels: int, ratio: int, groups: int) -> str | None:
    """Why ``out_channels`` at ``ratio`` with ``groups`` leaves no ghost channel, or None."""
    intrinsic = intrinsic_count(out_channels, ratio, groups)
    if intrinsic < out_channels:
        return None
    reason = (
        f"out_channels={out_channels} with ratio={ratio} and groups={groups} leaves no ghost "
        f"channels: the primary convolution alone needs {intrinsic} channels"
    )
    if groups > 1:
        per_group = out_channels // groups
        reason += (
            f" (each group's {per_group} channels must split evenly into kept filters and their "
            f"ghosts, and no divisor of {per_group} smaller than {per_group} is at least "
            f"ceil({per_group}/{ratio}))"
        )
    return reason
