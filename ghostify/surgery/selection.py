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

from ..errors import ConfigError
from ..layers.conv_types import (
    TORCH_CONVS,
    conv_class,
    conv_dims,
    conv_type_of,
    registered_conv_types,
)
from ..layers.ghost_module import check_conv
from ..options import (
    check_dw_size,
    check_ratio,
    intrinsic_count,
    no_ghost_reason,
    resolve_dw_size,
)
from .discovery import ConvSite
from .record import LayerSettings

OVERRIDE_KEYS = ("ratio", "dw_size")
ALL_DIMS = (1, 2, 3)


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
            check_dw_size(settings["dw_size"], f"{where}['dw_size']", allow_auto=True)
        checked[pattern] = dict(settings)
    return checked


def check_subclasses(allow: object) -> bool | tuple[type, ...]:
    """Validate ``allow_subclasses``: a bool, or the conv subclasses to treat as plain."""
    if isinstance(allow, bool):
        return allow
    if isinstance(allow, type):
        allow = (allow,)
    if isinstance(allow, Sequence) and all(
        isinstance(c, type) and issubclass(c, tuple(TORCH_CONVS)) for c in allow
    ):
        return tuple(allow)
    raise ConfigError(
        "allow_subclasses must be True, False or a list of nn.Conv1d/2d/3d subclasses that "
        f"compute a plain convolution; got {allow!r}"
    )


def check_dims(dims: object) -> tuple[int, ...]:
    """Validate ``dims``: the spatial dimensions of the convolutions to convert, among 1, 2, 3."""
    if isinstance(dims, int) and not isinstance(dims, bool):
        dims = (dims,)
    if (
        isinstance(dims, Sequence)
        and dims
        and all(isinstance(d, int) and not isinstance(d, bool) and d in ALL_DIMS for d in dims)
    ):
        return tuple(sorted(set(dims)))
    raise ConfigError(
        "dims must name the convolutions to convert by their spatial dimensions, a non-empty "
        f"subset of {ALL_DIMS} (1: Conv1d, 2: Conv2d, 3: Conv3d); got {dims!r}"
    )


@dataclass(frozen=True)
class Selection:
    """Which convolutions ``convert`` considers: ``convert(model, select=Selection(...))``.

    The same choices as ``convert``'s keywords of the same names, grouped so they can be built
    once and passed around (to ``convert``, to a budget, to a CLI). ``include`` / ``exclude``:
    glob patterns over qualified module names (``exclude`` wins); ``overrides``: ``{pattern:
    {"ratio": r, "dw_size": k}}``; ``skip_stem``: leave the first convolution run as it is;
    ``allow_subclasses``: True, or the conv subclasses that compute a plain convolution;
    ``dims``: which convolutions by spatial dimensions (1, 2, 3). Patterns are checked against
    the model when ``convert`` runs (a pattern that matches nothing is an error).
    """

    include: Sequence[str] | None = None
    exclude: Sequence[str] | None = None
    overrides: Mapping[str, Mapping[str, int | str]] | None = None
    skip_stem: bool = True
    allow_subclasses: bool | Sequence[type] = False
    dims: Sequence[int] = ALL_DIMS

    def rules(self, model: nn.Module, ratio: int, dw_size: int | str) -> Rules:
        """These choices checked against ``model``, with the global ``ratio`` and ``dw_size``."""
        check_ratio(ratio)
        check_dw_size(dw_size, allow_auto=True)
        if not isinstance(self.skip_stem, bool):
            raise ConfigError(f"skip_stem must be True or False; got {self.skip_stem!r}")
        names = [name for name, _ in model.named_modules() if name]
        return Rules(
            ratio=ratio,
            dw_size=dw_size,
            include=check_patterns(self.include, "include", names),
            exclude=check_patterns(self.exclude, "exclude", names),
            overrides=check_overrides(self.overrides, names),
            subclasses=check_subclasses(self.allow_subclasses),
            dims=check_dims(self.dims),
            skip_stem=self.skip_stem,
        )


@dataclass(frozen=True)
class Rules:
    """Which convolutions to convert and with which settings: the user's choices, checked."""

    ratio: int = 2
    dw_size: int | str = 3  # or "auto": resolved per convolution by its kernel size
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] | None = None
    overrides: dict[str, dict[str, int]] | None = None
    subclasses: bool | tuple[type, ...] = False
    dims: tuple[int, ...] = ALL_DIMS
    skip_stem: bool = True
    stem: str | None = None  # the first convolution run, when discovery saw the model run

    def settings_for(self, name: str, conv: nn.Module) -> LayerSettings:
        """The ratio and dw_size for layer ``name`` (the convolution ``conv``) after applying
        the documented precedence; ``dw_size="auto"`` is resolved by ``conv``'s kernel size."""
        settings = {"ratio": self.ratio, "dw_size": self.dw_size}
        for pattern, values in (self.overrides or {}).items():
            if pattern != name and matches(pattern, name):
                settings.update(values)
        settings.update((self.overrides or {}).get(name, {}))
        settings["dw_size"] = resolve_dw_size(settings["dw_size"], tuple(conv.kernel_size))
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
        dims = conv_dims(module)
        if dims not in self.dims:
            return f"a {dims}-D convolution, not selected by dims={self.dims}"
        if not is_convertible(module, self.subclasses):
            return unknown_subclass_reason(module)
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
        return savings_reason(module, self.settings_for(site.name, module))


def is_convertible(module: nn.Module, subclasses: bool | tuple[type, ...]) -> bool:
    """True for a registered conv type (torch's own, timm's, the user's), or a vouched subclass."""
    if conv_type_of(module) is not None or subclasses is True:
        return True
    return isinstance(subclasses, tuple) and conv_class(module) in subclasses


def unknown_subclass_reason(module: nn.Module) -> str:
    """Why a conv subclass is skipped, and what the user can do about it."""
    cls = conv_class(module)
    name, base = cls.__qualname__, next(b for b in TORCH_CONVS if isinstance(module, b))
    if cls is not type(module) and cls in registered_conv_types():
        return (
            f"a parametrized {name}: its primary layer would have to carry the parametrization; "
            "remove it (torch.nn.utils.parametrize.remove_parametrizations) to convert the layer"
        )
    return (
        f"{name} subclasses nn.{base.__name__} and may compute something else in forward; "
        f"declare how it converts with ghostify.register_conv_type({name}, ...), or pass "
        f"allow_subclasses=[{name}] if it is a plain convolution"
    )


def savings_reason(conv: nn.Module, settings: LayerSettings) -> str | None:
    """Why a GhostModule would not pay off for ``conv``, or None when it saves MACs."""
    ratio, dw_size = settings.ratio, settings.dw_size
    in_per_group = conv.in_channels // conv.groups
    if conv.groups > 1 and in_per_group == 1:
        return "depthwise convolution: already as cheap as a ghost operation"
    no_ghost = no_ghost_reason(conv.out_channels, ratio, conv.groups)
    if no_ghost is not None:
        return f"no ghost channels: {no_ghost}"
    intrinsic = intrinsic_count(conv.out_channels, ratio, conv.groups)
    kernel = math.prod(conv.kernel_size)
    slots = intrinsic * math.ceil((conv.out_channels - intrinsic) / intrinsic)
    before = conv.out_channels * in_per_group * kernel
    after = intrinsic * in_per_group * kernel + slots * dw_size ** len(conv.kernel_size)
    if after >= before:
        return (
            f"a GhostModule would not save MACs ({after} vs {before} per output pixel): "
            "too few input channels per group for the cheap operation to pay off"
        )
    return None
