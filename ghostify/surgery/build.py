"""Building the replacement GhostModules, and checking them before they go in."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.utils import parametrize

from ..errors import ConfigError, ConversionError
from ..fit import FitError, SharingFit, fit_as_built
from ..fit.shared import SHARING_TOLERANCE
from ..inputs import eval_mode
from ..layers.ghost_module import GhostModule
from .discovery import ConvSite
from .record import LayerSettings


def build_layers(
    model: nn.Module,
    layers: dict[str, LayerSettings],
    fitted: bool,
    on_layer: Callable[[str], object] = lambda _name: None,
    together: Sequence[Sequence[str]] = (),
    tolerance: float = SHARING_TOLERANCE,
) -> tuple[dict[str, GhostModule], list[SharingFit]]:
    """A GhostModule standing for each conv that ``layers`` names, fitted to its weights when
    ``fitted`` (all layers side by side in worker threads, each module built as its fit is
    queued: see ``ghostify.fit.fit_as_built``). ``on_layer(name)`` is called as each one is
    ready. Each set of names in ``together`` (one channel group's writers) gets one shared
    layout where that costs at most ``tolerance`` more fit (``ghostify.fit.shared``); returns
    the modules and, per set, what sharing measured and decided (empty when not fitted)."""
    names = list(layers)
    convs = [model.get_submodule(name) for name in names]
    for name, conv in zip(names, convs, strict=True):
        _warn_lost_extras(name, conv)
    built: dict[str, GhostModule] = {}

    def build(index: int) -> GhostModule:
        name, conv = names[index], convs[index]
        settings = layers[name]
        with _building(name):
            built[name] = GhostModule.like(
                conv, ratio=settings.ratio, dw_size=settings.dw_size, empty=fitted
            )
        return built[name]

    outcomes: list[SharingFit] = []
    if not fitted:
        for index, name in enumerate(names):
            build(index)
            on_layer(name)
    else:
        sets = [[names.index(name) for name in members] for members in together]
        try:
            outcomes = fit_as_built(
                convs, build, lambda index: on_layer(names[index]), sets, tolerance
            )
        except FitError as error:
            with _building(names[error.index]):
                raise error.__cause__ from None
    return {name: built[name] for name in names}, outcomes  # in the model's order


@contextmanager
def _building(name: str) -> Iterator[None]:
    try:
        yield
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
            stacklevel=5,
        )
    if parametrize.is_parametrized(conv):
        warnings.warn(
            f"{name!r} had parametrizations ({', '.join(conv.parametrizations)}); the "
            "GhostModule was fitted to the parametrized weight and does not keep them",
            stacklevel=5,
        )


def check_shapes(
    replacements: dict[str, GhostModule],
    sites: dict[str, ConvSite],
    on_layer: Callable[[], object] = lambda: None,
) -> None:
    """Each new layer must give the original's output shape for every input shape seen.

    The probe runs on the meta device: shapes are propagated through the module's own forward
    without computing anything, so the check costs nothing next to a forward pass.
    """
    for name, module in replacements.items():
        on_layer()
        site = sites.get(name)
        if site is None:
            continue
        state = {
            key: tensor.to("meta")
            for key, tensor in [*module.named_parameters(), *module.named_buffers()]
        }
        for in_shape, out_shape in zip(site.input_shapes, site.output_shapes, strict=True):
            probe = torch.empty(in_shape, dtype=module.primary_conv.weight.dtype, device="meta")
            with eval_mode(module), torch.no_grad():
                got = tuple(functional_call(module, state, (probe,)).shape)
            if got != out_shape:
                raise ConversionError(
                    f"GhostModule for {name!r} gives shape {got} for input {in_shape}, the "
                    f"original gave {out_shape}; the model is unchanged"
                )
