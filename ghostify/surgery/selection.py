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
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

from torch import nn
from torch.nn.utils import parametrize

from ..errors import ConfigError
from ..layers.ghost_module import check_conv
from ..options import check_dw_size, check_ratio, intrinsic_count
from .discovery import ConvSite
from .record import LayerSettings

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


def check_subclasses(allow: object) -> bool | tuple[type, ...]:
    """Validate ``allow_subclasses``: a bool, or the Conv2d subclasses to treat as plain."""
    if isinstance(allow, bool):
        return allow
    if isinstance(allow, type):
        allow = (allow,)
    if isinstance(allow, Sequence) and all(
        isinstance(c, type) and issubclass(c, nn.Conv2d) for c in allow
    ):
        return tuple(allow)
    raise ConfigError(
        "allow_subclasses must be True, False or a list of nn.Conv2d subclasses that compute a "
        f"plain convolution; got {allow!r}"
    )


@dataclass(frozen=True)
class Selection:
    """Which convolutions to convert and with which settings: the user's choices, checked."""

    ratio: int = 2
    dw_size: int = 3
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] | None = None
    overrides: dict[str, dict[str, int]] | None = None
    subclasses: bool | tuple[type, ...] = False
    skip_stem: bool = True
    stem: str | None = None  # the first convolution run, when discovery saw the model run

    def settings_for(self, name: str) -> LayerSettings:
        """The ratio and dw_size for layer ``name`` after applying the documented precedence."""
        settings = {"ratio": self.ratio, "dw_size": self.dw_size}
        for pattern, values in (self.overrides or {}).items():
            if pattern != name and matches(pattern, name):
                settings.update(values)
        settings.update((self.overrides or {}).get(name, {}))
        return LayerSettings(**settings)

    def skip_reason(self, site: ConvSite) -> str | None:
        """Why ``site`` stays as it is, or None when it should be converted."""
        module = site.module
        if site.kind == "ghost":
            return "already a GhostModule"
        if site.kind == "scripted":
            return (
                "inside a TorchScript (torch.jit.script) module, whose code cannot be rewritten; "
                "convert the eager module before scripting it"
            )
        check_conv(module)  # an uninitialised LazyConv2d is an error, not a skip
        if not is_plain_conv(module, self.subclasses):
            name = type(module).__qualname__
            return (
                f"{name} subclasses nn.Conv2d and may compute something else in forward; pass "
                f"allow_subclasses=[{name}] if it is a plain convolution"
            )
        if site.name == "":
            return "the model itself is the convolution; wrap it in a module to convert it"
        if self.exclude and (hit := next((p for p in self.exclude if matches(p, site.name)), None)):
            return f"excluded by pattern {hit!r}"
        if self.include and not any(matches(p, site.name) for p in self.include):
            return "not selected by include"
        if self.skip_stem and site.name == self.stem:
            return "network stem (first convolution run); pass skip_stem=False to convert it"
        if site.weight_read_directly:
            return "the model reads this layer's weight or bias directly, not only by calling it"
        return savings_reason(module, self.settings_for(site.name))


def is_plain_conv(module: nn.Module, subclasses: bool | tuple[type, ...]) -> bool:
    """True for an exact nn.Conv2d (parametrized or not), or a subclass the user vouched for."""
    cls = type(module)
    if parametrize.is_parametrized(module):
        cls = cls.__bases__[0]  # ParametrizedConv2d wraps the user's class
    if cls is nn.Conv2d or subclasses is True:
        return True
    return isinstance(subclasses, tuple) and cls in subclasses


def savings_reason(conv: nn.Conv2d, settings: LayerSettings) -> str | None:
    """Why a GhostModule would not pay off for ``conv``, or None when it saves MACs."""
    ratio, dw_size = settings.ratio, settings.dw_size
    in_per_group = conv.in_channels // conv.groups
    if conv.groups > 1 and in_per_group == 1:
        return "depthwise convolution: already as cheap as a ghost operation"
    intrinsic = intrinsic_count(conv.out_channels, ratio, conv.groups)
    if intrinsic >= conv.out_channels:
        return (
            f"no ghost channels: {conv.out_channels} output channels at ratio {ratio} with "
            f"{conv.groups} groups need {intrinsic} intrinsic channels"
        )
    kernel = conv.kernel_size[0] * conv.kernel_size[1]
    slots = intrinsic * math.ceil((conv.out_channels - intrinsic) / intrinsic)
    before = conv.out_channels * in_per_group * kernel
    after = intrinsic * in_per_group * kernel + slots * dw_size**2
    if after >= before:
        return (
            f"a GhostModule would not save MACs ({after} vs {before} per output pixel): "
            "too few input channels per group for the cheap operation to pay off"
        )
    return None
