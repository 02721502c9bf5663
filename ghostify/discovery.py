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
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from .ghost_module import GhostModule
from .inputs import eval_mode


@dataclass
class ConvSite:
    """One convolution-like module of a model and what discovery learnt about it."""

    name: str
    module: nn.Module
    kind: str  # "conv" (an nn.Conv2d or subclass), "ghost" (already converted) or "scripted"
    found_by: str = "module-walk"
    order: int | None = None  # position in execution order, None when never seen running
    calls: int = 0
    inputs_from: list[str] = field(default_factory=list)
    feeds: list[str] = field(default_factory=list)
    weight_read_directly: bool = False
    input_shapes: list[tuple[int, ...]] = field(default_factory=list)
    output_shapes: list[tuple[int, ...]] = field(default_factory=list)


def site_kind(module: nn.Module) -> str | None:
    """The discovery kind of ``module``, or None if it is not a convolution we account for."""
    if isinstance(module, GhostModule):
        return "ghost"
    if isinstance(module, nn.Conv2d):
        return "conv"
    if isinstance(module, torch.jit.ScriptModule) and getattr(module, "original_name", "") in (
        "Conv2d",
        "LazyConv2d",
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
        return site_kind(module) is not None or super().is_leaf_module(module, qualname)


def _trace(module: nn.Module) -> fx.Graph | None:
    """The fx graph of ``module``, or None when it does not trace."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _ConvLeafTracer().trace(module)
    except Exception:  # any failure means "does not trace"; the next step takes over
        return None


def _next_order(sites: dict[str, ConvSite]) -> int:
    return 1 + max((s.order for s in sites.values() if s.order is not None), default=-1)


def _describe(node: fx.Node) -> str:
    if node.op == "call_module":
        return str(node.target)
    if node.op in ("call_function", "call_method"):
        return getattr(node.target, "__name__", str(node.target))
    return node.op if node.op != "placeholder" else "input"


def _read_graph(graph: fx.Graph, prefix: str, sites: dict[str, ConvSite], how: str) -> None:
    """Record call order, call counts, neighbours and direct weight reads found in ``graph``."""
    order = _next_order(sites)
    for node in graph.nodes:
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
        site.inputs_from += [_describe(n) for n in node.all_input_nodes]
        site.feeds += [_describe(n) for n in node.users]


def _trace_submodules(module: nn.Module, prefix: str, sites: dict[str, ConvSite]) -> None:
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
            _read_graph(graph, f"{qualified}.", sites, "fx-submodule")
        else:
            _trace_submodules(child, f"{qualified}.", sites)


def _run_with_hooks(model: nn.Module, args: tuple[Any, ...], sites: dict[str, ConvSite]) -> None:
    """One eval-mode, no-grad forward pass recording each conv's calls and tensor shapes."""
    counter = [_next_order(sites)]

    def make_hook(site: ConvSite):
        def hook(_module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            if site.order is None:
                site.order = counter[0]
                counter[0] += 1
            if site.found_by in ("module-walk", "hooks"):  # fx, when it worked, counted calls
                site.found_by = "hooks"
                site.calls += 1
            if isinstance(inputs[0], torch.Tensor) and isinstance(output, torch.Tensor):
                site.input_shapes.append(tuple(inputs[0].shape))
                site.output_shapes.append(tuple(output.shape))

        return hook

    handles = [
        site.module.register_forward_hook(make_hook(site))
        for site in sites.values()
        if site.kind != "scripted"  # script modules run their own compiled code, no hooks
    ]
    try:
        with eval_mode(model), torch.no_grad():
            model(*args)
    finally:
        for handle in handles:
            handle.remove()


def find_convs(model: nn.Module, args: tuple[Any, ...] | None = None) -> list[ConvSite]:
    """All conv-like modules of ``model``: those seen running first (in order), then the rest."""
    sites = list_sites(model)
    if not sites:
        return []
    graph = _trace(model)
    if graph is not None:
        _read_graph(graph, "", sites, "fx")
    if args is not None:
        _run_with_hooks(model, args, sites)
    elif graph is None:
        _trace_submodules(model, "", sites)
    seen = sorted((s for s in sites.values() if s.order is not None), key=lambda s: s.order)
    unseen = [s for s in sites.values() if s.order is None]
    return seen + unseen
