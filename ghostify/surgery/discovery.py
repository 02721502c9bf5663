"""Find every convolution in a model, in execution order, and record how each was found.

Discovery falls back step by step so that a model that does not trace still converts:

1. ``fx``: torch.fx traces the whole model (convolutions are leaves).
2. ``hooks``: when example inputs are given, one eval-mode forward pass with hooks on every conv.
3. ``fx-submodule``: without inputs, trace each child module that traces, recursing into those
   that do not; children are taken in registration order, the best guess at execution order
   when nothing runs.
4. ``module-walk``: convolutions no step saw are still listed, in registration order.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from ..inputs import eval_mode
from ..layers.conv_types import TORCH_CONVS
from ..layers.ghost_module import GhostModule
from .graph import Neighbour, TracedGraph, neighbour
from .leaves import frozen_batchnorms

_SCRIPTED_CONVS = {f"{prefix}Conv{dims}d" for prefix in ("", "Lazy") for dims in (1, 2, 3)}


@dataclass
class ConvSite:
    """One convolution-like module of a model and what discovery learnt about it."""

    name: str
    module: nn.Module
    kind: str  # "conv" (an nn.Conv1d/2d/3d or subclass), "ghost" (already converted) or "scripted"
    found_by: str = "module-walk"
    order: int | None = None  # position in execution order, None when never seen running
    calls: int = 0
    producers: list[Neighbour] = field(default_factory=list)  # what feeds each call, typed
    consumers: list[Neighbour] = field(default_factory=list)  # who reads its output, typed
    weight_read_directly: bool = False
    input_shapes: list[tuple[int, ...]] = field(default_factory=list)
    output_shapes: list[tuple[int, ...]] = field(default_factory=list)


def site_kind(module: nn.Module) -> str | None:
    """The discovery kind of ``module``, or None if it is not a convolution we account for."""
    if isinstance(module, GhostModule):
        return "ghost"
    if isinstance(module, tuple(TORCH_CONVS)):
        return "conv"
    if isinstance(module, torch.jit.ScriptModule) and getattr(module, "original_name", "") in (
        _SCRIPTED_CONVS
    ):
        return "scripted"
    return None


def list_sites(model: nn.Module) -> dict[str, ConvSite]:
    """Every conv-like module under ``model`` (first name of each), not looking inside ghosts."""
    sites: dict[str, ConvSite] = {}
    seen: set[int] = set()
    ghost_prefixes: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in ghost_prefixes):
            continue  # a GhostModule's own convs belong to it
        kind = site_kind(module)
        if kind is None or id(module) in seen:
            continue
        seen.add(id(module))
        sites[name] = ConvSite(name=name, module=module, kind=kind)
        if kind == "ghost":
            ghost_prefixes.append(f"{name}.")
    return sites


class _ConvLeafTracer(fx.Tracer):
    """An fx tracer that stops at convolutions and GhostModules (so they appear as call sites)."""

    def is_leaf_module(self, module: nn.Module, qualname: str) -> bool:
        if site_kind(module) is not None or isinstance(module, frozen_batchnorms()):
            return True
        return super().is_leaf_module(module, qualname)


def _trace(module: nn.Module) -> fx.Graph | None:
    """The fx graph of ``module``, or None when it does not trace."""
    try:
        with warnings.catch_warnings(), _attributes_kept(module):
            warnings.simplefilter("ignore")
            return _ConvLeafTracer().trace(module)
    except Exception:  # any failure means "does not trace"; the next step takes over
        return None


@contextmanager
def _attributes_kept(module: nn.Module) -> Iterator[None]:
    """Put back every attribute a trace set on ``module`` or its submodules.

    A forward that caches something on first call (torchvision's ``MultiScaleRoIAlign`` keeps
    its feature-map scales) would otherwise keep fx Proxies from the trace, and the model would
    fail on its next real call.
    """
    saved = [(m, dict(m.__dict__)) for m in module.modules()]
    try:
        yield
    finally:
        for owner, attributes in saved:
            for key in [key for key in owner.__dict__ if key not in attributes]:
                del owner.__dict__[key]
            owner.__dict__.update(attributes)


def _next_order(sites: dict[str, ConvSite]) -> int:
    return 1 + max((s.order for s in sites.values() if s.order is not None), default=-1)


def _read_graph(traced: TracedGraph, sites: dict[str, ConvSite], how: str) -> None:
    """Record call order, call counts, neighbours and direct weight reads found in a graph."""
    order = _next_order(sites)
    prefix = traced.prefix
    modules = traced.modules()
    for node in traced.graph.nodes:
        target = f"{prefix}{node.target}" if isinstance(node.target, str) else None
        if node.op == "get_attr" and target is not None:
            owner = target.rsplit(".", 1)[0]
            if owner in sites:
                sites[owner].weight_read_directly = True
            continue
        if node.op != "call_module" or target not in sites:
            continue
        site = sites[target]
        if site.order is None:
            site.order = order
            order += 1
        site.found_by = how
        site.calls += 1
        site.producers += [neighbour(n, modules, prefix) for n in node.all_input_nodes]
        site.consumers += [neighbour(n, modules, prefix) for n in node.users]


def _trace_submodules(
    module: nn.Module, prefix: str, sites: dict[str, ConvSite], graphs: list[TracedGraph]
) -> None:
    """Trace each child that traces; recurse into the ones that do not."""
    for child_name, child in module.named_children():
        qualified = f"{prefix}{child_name}"
        if qualified in sites:
            # A conv called directly by an untraceable parent: registration order is our best
            # guess at execution order (so the stem of such a model is its first conv).
            site = sites[qualified]
            site.order = _next_order(sites)
            continue
        if site_kind(child) is not None:
            continue
        graph = _trace(child)
        if graph is not None:
            traced = TracedGraph(f"{qualified}.", graph, child)
            graphs.append(traced)
            _read_graph(traced, sites, "fx-submodule")
        else:
            _trace_submodules(child, f"{qualified}.", sites, graphs)


@contextmanager
def recording_calls(sites: Iterable[ConvSite]) -> Iterator[None]:
    """Forward hooks that count each site's calls and keep its tensor shapes, while inside.

    A site first seen running gets the next execution-order number.
    """
    sites = [site for site in sites if site.kind != "scripted"]  # script modules run no hooks
    counter = [1 + max((s.order for s in sites if s.order is not None), default=-1)]

    def make_hook(site: ConvSite) -> Callable[..., None]:
        def hook(_module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            if site.order is None:
                site.order = counter[0]
                counter[0] += 1
            site.calls += 1
            if inputs and isinstance(inputs[0], torch.Tensor) and isinstance(output, torch.Tensor):
                site.input_shapes.append(tuple(inputs[0].shape))
                site.output_shapes.append(tuple(output.shape))

        return hook

    handles = [site.module.register_forward_hook(make_hook(site)) for site in sites]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _run_with_hooks(model: nn.Module, args: tuple[Any, ...], sites: dict[str, ConvSite]) -> None:
    """One eval-mode, no-grad forward pass recording each conv's calls and tensor shapes."""
    traced_calls = {name: site.calls for name, site in sites.items()}
    with recording_calls(sites.values()), eval_mode(model), torch.no_grad():
        model(*args)
    for name, site in sites.items():
        if site.found_by in ("module-walk", "hooks"):
            site.found_by = "hooks" if site.calls > traced_calls[name] else site.found_by
        else:  # fx, when it worked, counted the calls already
            site.calls = traced_calls[name]


@dataclass
class Discovery:
    """What discovery found: every conv site (execution order first) and the graphs it traced."""

    sites: list[ConvSite]
    graphs: list[TracedGraph]

    def site(self, name: str) -> ConvSite | None:
        return next((s for s in self.sites if s.name == name), None)


def discover(model: nn.Module, args: tuple[Any, ...] | None = None) -> Discovery:
    """All conv-like modules of ``model``, those seen running first (in order), then the rest."""
    sites = list_sites(model)
    graphs: list[TracedGraph] = []
    if not sites:
        return Discovery([], graphs)
    graph = _trace(model)
    if graph is not None:
        graphs.append(TracedGraph("", graph, model))
        _read_graph(graphs[0], sites, "fx")
    if args is not None:
        _run_with_hooks(model, args, sites)
    elif graph is None:
        _trace_submodules(model, "", sites, graphs)
    seen = sorted((s for s in sites.values() if s.order is not None), key=lambda s: s.order)
    unseen = [s for s in sites.values() if s.order is None]
    return Discovery(seen + unseen, graphs)


def trace_graphs(model: nn.Module) -> list[TracedGraph]:
    """The fx graphs of ``model``: the whole model's, or else those of its traceable parts."""
    graph = _trace(model)
    if graph is not None:
        return [TracedGraph("", graph, model)]
    graphs: list[TracedGraph] = []
    _trace_submodules(model, "", {}, graphs)
    return graphs
