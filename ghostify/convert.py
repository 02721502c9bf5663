"""The conversion pass: discover convolutions, decide which to replace, build, check, swap."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from .discovery import ConvSite, find_convs
from .errors import ConfigError, ConversionError, PlanError
from .ghost_module import GhostModule, check_conv, conv_config
from .inputs import as_args, describe_args, eval_mode
from .options import check_dw_size, check_init, check_ratio, intrinsic_count
from .plan import PLAN_ATTR, check_plan, layer_entry, plan_of
from .selection import (
    check_overrides,
    check_patterns,
    matches,
    no_match_message,
    settings_for,
)

__all__ = ["convert", "plan_of"]


def convert(
    model: nn.Module,
    *,
    ratio: int = 2,
    dw_size: int = 3,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    overrides: dict[str, dict[str, int]] | None = None,
    init: str = "weights",
    example_inputs: Any = None,
    plan: dict[str, Any] | None = None,
    skip_stem: bool = True,
    allow_subclasses: bool | Sequence[type] = False,
) -> nn.Module:
    """Rewrite ``model``'s Conv2d layers as GhostModules, in place, and return ``model``.

    Every convolution is either converted or recorded as skipped with a reason (see
    ``plan_of``). The pass is atomic: if anything fails, ``model`` is left exactly as it was.
    With ``plan``, the layers and settings recorded by ``plan_of`` are rebuilt instead, so a
    saved state_dict of the converted model loads into the result.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    check_ratio(ratio)
    check_dw_size(dw_size)
    check_init(init)
    subclasses = _check_subclasses(allow_subclasses)
    args = None if example_inputs is None else as_args(example_inputs)
    if plan is not None:
        entries = check_plan(plan)
        replacements, skipped = _plan_replacements(model, entries, init), plan.get("skipped", [])
        found_by = {entry["name"]: entry.get("found_by") for entry in entries}
        options = dict(plan.get("options") or {})
        sites = {site.name: site for site in find_convs(model, args)} if args else {}
    else:
        module_names = [name for name, _ in model.named_modules() if name]
        include = check_patterns(include, "include", module_names)
        exclude = check_patterns(exclude, "exclude", module_names)
        overrides = check_overrides(overrides, module_names)
        options = {
            "ratio": ratio,
            "dw_size": dw_size,
            "include": list(include) if include else None,
            "exclude": list(exclude) if exclude else None,
            "overrides": overrides,
            "init": init,
            "skip_stem": skip_stem,
            "allow_subclasses": [c.__qualname__ for c in subclasses]
            if isinstance(subclasses, tuple)
            else subclasses,
        }
        found = _discover(model, args)
        sites = {site.name: site for site in found}
        replacements, skipped, found_by = {}, [], {}
        stem = found[0].name if found and found[0].order is not None else None
        for site in found:
            settings = settings_for(site.name, ratio, dw_size, overrides)
            reason = skip_reason(site, settings, include, exclude, subclasses, skip_stem, stem)
            if reason is not None:
                skipped.append({"name": site.name, "reason": reason, "found_by": site.found_by})
                continue
            replacements[site.name] = _build(site.name, site.module, settings, init)
            found_by[site.name] = site.found_by
    if args is not None:
        _check_layer_shapes(replacements, sites)
    _swap_checked(model, replacements, args)
    layers = [layer_entry(name, new, found_by.get(name)) for name, new in replacements.items()]
    setattr(model, PLAN_ATTR, {"layers": layers, "skipped": skipped, "options": options})
    return model


def _plan_replacements(
    model: nn.Module, entries: list[dict[str, Any]], init: str
) -> dict[str, GhostModule]:
    """Build the GhostModules a plan records, after checking each layer matches the plan."""
    conv_names = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    replacements = {}
    for entry in entries:
        name = entry["name"]
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise PlanError(no_match_message("plan layer", name, conv_names)) from None
        if isinstance(module, GhostModule):
            raise PlanError(f"plan layer {name!r} is already a GhostModule in this model")
        if not isinstance(module, nn.Conv2d):
            raise PlanError(f"plan layer {name!r} is a {type(module).__name__}, not an nn.Conv2d")
        actual = conv_config(module)
        if actual != entry["conv"]:
            differences = ", ".join(
                f"{key}: plan {entry['conv'].get(key)!r}, model {actual[key]!r}"
                for key in actual
                if entry["conv"].get(key) != actual[key]
            )
            raise PlanError(f"plan layer {name!r} does not fit the model ({differences})")
        settings = {"ratio": entry["ratio"], "dw_size": entry["dw_size"]}
        replacements[name] = _build(name, module, settings, init)
    return replacements


def _discover(model: nn.Module, args: tuple[Any, ...] | None) -> list[ConvSite]:
    try:
        return find_convs(model, args)
    except Exception as error:
        raise ConfigError(
            f"the model rejected example_inputs ({describe_args(args or ())}): "
            f"{type(error).__name__}: {error}"
        ) from error


def _check_subclasses(allow: object) -> bool | tuple[type, ...]:
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


def _is_plain_conv(module: nn.Module, subclasses: bool | tuple[type, ...]) -> bool:
    cls = type(module)
    if parametrize.is_parametrized(module):
        cls = cls.__bases__[0]  # ParametrizedConv2d wraps the user's class
    if cls is nn.Conv2d or subclasses is True:
        return True
    return isinstance(subclasses, tuple) and cls in subclasses


def skip_reason(
    site: ConvSite,
    settings: dict[str, int],
    include: Sequence[str] | None,
    exclude: Sequence[str] | None,
    subclasses: bool | tuple[type, ...],
    skip_stem: bool,
    stem: str | None,
) -> str | None:
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
    if not _is_plain_conv(module, subclasses):
        name = type(module).__qualname__
        return (
            f"{name} subclasses nn.Conv2d and may compute something else in forward; pass "
            f"allow_subclasses=[{name}] if it is a plain convolution"
        )
    if site.name == "":
        return "the model itself is the convolution; wrap it in a module to convert it"
    if exclude and (hit := next((p for p in exclude if matches(p, site.name)), None)):
        return f"excluded by pattern {hit!r}"
    if include and not any(matches(p, site.name) for p in include):
        return "not selected by include"
    if skip_stem and site.name == stem:
        return "network stem (first convolution run); pass skip_stem=False to convert it"
    if site.weight_read_directly:
        return "the model reads this layer's weight or bias directly, not only by calling it"
    return savings_reason(module, settings["ratio"], settings["dw_size"])


def savings_reason(conv: nn.Conv2d, ratio: int, dw_size: int) -> str | None:
    """Why a GhostModule would not pay off for ``conv``, or None when it saves MACs."""
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
    before = conv.out_channels * in_per_group * kernel
    after = intrinsic * in_per_group * kernel + (conv.out_channels - intrinsic) * dw_size**2
    if after >= before:
        return (
            f"a GhostModule would not save MACs ({after} vs {before} per output pixel): "
            "too few input channels per group for the cheap operation to pay off"
        )
    return None


def _build(name: str, conv: nn.Module, settings: dict[str, int], init: str) -> GhostModule:
    _warn_lost_extras(name, conv)
    try:
        return GhostModule.from_conv(conv, settings["ratio"], settings["dw_size"], init)
    except ConfigError:
        raise
    except Exception as error:
        raise ConversionError(
            f"building the GhostModule for {name!r} failed; the model is unchanged: {error}"
        ) from error


def _warn_lost_extras(name: str, conv: nn.Module) -> None:
    hooks = [
        kind
        for kind in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks")
        if getattr(conv, kind, None)
    ]
    if hooks:
        warnings.warn(
            f"{name!r} had hooks ({', '.join(hooks)}) that the GhostModule replacing it does not "
            "carry; register them again on the new module if you need them",
            stacklevel=4,
        )
    if parametrize.is_parametrized(conv):
        warnings.warn(
            f"{name!r} had parametrizations ({', '.join(conv.parametrizations)}); the "
            "GhostModule was fitted to the parametrized weight and does not keep them",
            stacklevel=4,
        )


def _check_layer_shapes(replacements: dict[str, GhostModule], sites: dict[str, ConvSite]) -> None:
    """Each new layer must give the original's output shape for every input shape seen."""
    for name, module in replacements.items():
        site = sites.get(name)
        if site is None:
            continue
        for in_shape, out_shape in zip(site.input_shapes, site.output_shapes, strict=True):
            probe = module.primary_conv.weight.new_zeros(in_shape)
            with eval_mode(module), torch.no_grad():
                got = tuple(module(probe).shape)
            if got != out_shape:
                raise ConversionError(
                    f"GhostModule for {name!r} gives shape {got} for input {in_shape}, the "
                    f"original gave {out_shape}; the model is unchanged"
                )


def _parents_of(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """For each module, every (parent, attribute) registering it: a shared conv has several."""
    parents: dict[int, list[tuple[nn.Module, str]]] = {}
    for parent in model.modules():
        for key, child in parent._modules.items():
            if child is not None:
                parents.setdefault(id(child), []).append((parent, key))
    return parents


def _swap_checked(
    model: nn.Module, replacements: dict[str, GhostModule], args: tuple[Any, ...] | None
) -> None:
    """Swap every replacement in; undo all of it if a swap or the check forward pass fails."""
    if not replacements:
        return
    parents = _parents_of(model)
    done: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for name, new in replacements.items():
            old = model.get_submodule(name)
            for parent, key in parents[id(old)]:
                setattr(parent, key, new)
                done.append((parent, key, old))
        if args is not None:
            with eval_mode(model), torch.no_grad():
                model(*args)
    except Exception as error:
        for parent, key, old in reversed(done):
            setattr(parent, key, old)
        raise ConversionError(
            f"the converted model failed ({type(error).__name__}: {error}); "
            "every layer was put back, the model is unchanged"
        ) from error
