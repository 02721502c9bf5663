"""Model SPEC strings: ``torchvision:NAME``, ``timm:NAME`` or ``package.module:factory``.

A SPEC names how to build a model, so a checkpoint can record where its architecture came from
and ``ghostify report`` can rebuild it. Zoo models are always built without pretrained weights
(the checkpoint supplies the weights).
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from ..errors import ConfigError

if TYPE_CHECKING:
    from torch import nn

FORMS = "torchvision:NAME, timm:NAME or package.module:factory"
_EXTRAS = {"torchvision": "vision", "timm": "timm"}


def parse_spec(spec: object) -> tuple[str, str]:
    """``(source, name)`` of a well-formed SPEC; a ConfigError naming the forms otherwise."""
    if not isinstance(spec, str) or spec.count(":") != 1 or "" in spec.split(":"):
        hint = ""
        if isinstance(spec, str) and ":" not in spec and spec.isidentifier():
            hint = f" (a zoo model is named with its zoo: torchvision:{spec} or timm:{spec})"
        raise ConfigError(f"model SPEC must look like {FORMS}; got {spec!r}{hint}")
    source, name = spec.split(":")
    return source, name


def check_spec(spec: str) -> None:
    """What can be known of ``spec`` without importing it (so without torch): its form, and that
    its library or top-level module is installed or on the path. A ConfigError otherwise."""
    source, _ = parse_spec(spec)
    top = source.split(".")[0]
    if not top.isidentifier() or importlib.util.find_spec(top) is None:
        if source in _EXTRAS:
            raise ConfigError(
                f"{source}:NAME needs {source}: pip install 'ghostify[{_EXTRAS[source]}]'"
            )
        raise ConfigError(
            f"cannot import {source!r} for model SPEC {spec!r}: no module {top!r} in the current "
            f"folder or on the Python path; SPEC must be {FORMS}"
        )


def build_model(spec: str) -> nn.Module:
    """Build the model ``spec`` names, with random weights, in training mode as constructed."""
    from torch import nn

    source, name = parse_spec(spec)
    if source == "torchvision":
        model = _torchvision(name)
    elif source == "timm":
        model = _timm(name)
    else:
        model = _factory(source, name, spec)
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"{spec!r} returned a {type(model).__name__}, not a torch.nn.Module; the factory "
            "must return the model"
        )
    return model


def _torchvision(name: str) -> nn.Module:
    try:
        import torchvision
    except ImportError:
        raise ConfigError(
            "torchvision:NAME needs torchvision: pip install 'ghostify[vision]'"
        ) from None
    known = torchvision.models.list_models()
    if name not in known:
        raise ConfigError(_unknown("torchvision", name, known))
    return torchvision.models.get_model(name, weights=None)


def _timm(name: str) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise ConfigError("timm:NAME needs timm: pip install 'ghostify[timm]'") from None
    known = timm.list_models()
    if name not in known:
        raise ConfigError(_unknown("timm", name, known))
    return timm.create_model(name, pretrained=False)


def _factory(module_name: str, attribute: str, spec: str) -> nn.Module:
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError(
            f"cannot import {module_name!r} for model SPEC {spec!r} ({error}); SPEC must be {FORMS}"
        ) from None
    target: object = module
    for part in attribute.split("."):  # "module:Class.factory" reaches a classmethod
        if not hasattr(target, part):
            public = [n for n in dir(target) if not n.startswith("_")]
            raise ConfigError(_unknown(module_name, attribute, public, what="attribute"))
        target = getattr(target, part)
    if not callable(target):
        raise ConfigError(f"{spec!r} is a {type(target).__name__}, not a callable model factory")
    factory: Callable[[], object] = target
    try:
        return factory()  # type: ignore[return-value]
    except TypeError as error:
        raise ConfigError(
            f"calling {spec!r} with no arguments failed ({error}); point SPEC at a factory that "
            "needs no arguments"
        ) from None


def _unknown(source: str, name: str, known: Iterable[str], what: str = "model") -> str:
    close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return f"unknown {source} {what} {name!r}{hint}"
