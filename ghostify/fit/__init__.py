"""Fitting a GhostModule to the convolution it replaces: one entry point, ``fit``.

Data-free (weights only, ``data_free``) by default; with activations, the layout is chosen and the
kernels fitted by least squares on what the layer really sees (``data_driven``, from sums
accumulated batch by batch in ``statistics``; ``activations`` refits the kernels of a fixed
layout).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from functools import cache

import torch
from threadpoolctl import ThreadpoolController
from torch import nn

from ..errors import ConfigError
from ..layers.ghost_module import GhostModule, check_conv
from .activations import fit_on_activations
from .data_free import draft_from, finish_layout
from .kept_filters import choose_kept
from .shared import SHARING_TOLERANCE, SharingFit, fit_group
from .statistics import KernelStatistics, LayerStatistics
from .write import conv_kind, write_layout

__all__ = [
    "FitError",
    "KernelStatistics",
    "LayerStatistics",
    "SharingFit",
    "fit",
    "fit_all",
    "fit_as_built",
    "fit_group",
]

# fit_all: at most this many worker threads.
_MAX_FITTERS = 8

Activations = torch.Tensor | Iterable[torch.Tensor] | LayerStatistics | KernelStatistics


@torch.no_grad()
def fit(
    original: nn.Module,
    ghost: GhostModule,
    activations: Activations | None = None,
    *,
    targets: torch.Tensor | None = None,
    choose: str = "activations",
    refit_intrinsic: bool = False,
    intrinsic_ridge: float = 0.05,
    channel_weights: torch.Tensor | None = None,
) -> GhostModule:
    """Fit ``ghost`` to ``original`` in place and return it; ``original`` is not modified.

    Always: keep a subset of the original filters exactly in the primary conv, assign every other
    filter to a cheap-conv slot and fit its depthwise kernel to the filter (data-free), and set
    ``ghost``'s channel order so its outputs line up with ``original``'s.

    With ``activations`` (inputs of ``original``: a tensor, an iterable of batches or of
    ``(inputs, targets)`` pairs, or statistics already accumulated from them), the fit then uses
    what the layer really sees. ``targets`` (default ``original(inputs)``) are the outputs
    wanted; in an asymmetric calibration, the original layer's outputs in the original model.

    - ``choose="activations"``: choose the intrinsic channels and the ghost-to-slot assignment
      that minimise the reconstruction error on the activations (kept only if it beats the
      data-free layout there), then fit every kernel and bias by least squares;
      ``refit_intrinsic`` also refits the intrinsic filters (ridge regression towards the
      original filter, of strength ``intrinsic_ridge``), which lets a layer compensate the errors
      of the layers before it. ``channel_weights`` (one per output channel) weight each channel's
      squared error, e.g. by the square of the scale of a BatchNorm that follows.
    - ``choose="weights"``: keep the data-free layout, refit only the cheap kernels and biases.

    A registered conv subclass (``register_conv_type``) is fitted on its effective filters, and
    its kept filters go into a primary layer of its own kind; any other class is taken as plain.
    """
    _fit_layer(original, ghost)
    if activations is not None:
        fit_on_activations(
            original,
            ghost,
            activations,
            targets=targets,
            choose=choose,
            refit_intrinsic=refit_intrinsic,
            intrinsic_ridge=intrinsic_ridge,
            channel_weights=channel_weights,
        )
    return ghost


class FitError(Exception):
    """Fitting pair ``index`` of ``fit_all`` failed; the cause is chained."""

    def __init__(self, index: int) -> None:
        super().__init__(f"fitting layer {index} failed")
        self.index = index


@torch.no_grad()
def fit_all(
    pairs: Sequence[tuple[nn.Module, GhostModule]],
    on_fitted: Callable[[int], object] = lambda _index: None,
) -> None:
    """``fit(original, ghost)`` (data-free) for every pair, with the same results.

    Layers are fitted side by side in worker threads (at least two; as many as torch has
    threads), each on one core: torch, scipy and lapjv free the GIL in their kernels, and a layer's
    fit is many small operations that one core runs about as fast as several. Each layer's fit
    is done by one thread alone, so the results do not depend on the threads or on the order
    the layers are started in (largest first). ``on_fitted(i)`` is called as pair ``i`` is
    done, in the order they finish, by the thread that fitted it (the caller's thread waits
    once, not once per layer: waking it up took the GIL from the workers 52 times on ResNet-50).
    A ``ConfigError`` is raised as it is, any other failure as ``FitError(i)`` from its cause
    (of several, the one of the lowest ``i``); layers not started by then are not fitted.
    """
    fit_as_built([original for original, _ in pairs], lambda i: pairs[i][1], on_fitted)


@torch.no_grad()
def fit_as_built(
    originals: Sequence[nn.Module],
    build: Callable[[int], GhostModule],
    on_fitted: Callable[[int], object] = lambda _index: None,
    together: Sequence[Sequence[int]] = (),
    tolerance: float = SHARING_TOLERANCE,
) -> list[SharingFit]:
    """``fit_all`` of ``originals[i]`` and ``build(i)``, each ghost built on the caller's thread
    just before its fit is queued, so that building them (Python) overlaps the first fits (BLAS
    mostly: their filters' Gram matrices). If ``build`` raises, no further fit starts, and its
    error is raised once the fits running are done.

    Each set of indices in ``together`` (the writers of one channel group) is fitted as one
    task by ``shared.fit_group``: one shared layout where it costs at most ``tolerance`` more
    fit residual, else each layer's own. Returns what each set measured and decided, in order.
    """
    workers = min(_MAX_FITTERS, max(2, torch.get_num_threads()))
    sets = [list(members) for members in together]
    in_sets = {i for members in sets for i in members}
    tasks = sets + [[i] for i in range(len(originals)) if i not in in_sets]
    # Largest first, so that no big layer is left running alone at the end (4-5% faster on
    # ResNet-50 than model order, whose largest layers come last); a set fits twice.
    largest_first = sorted(
        range(len(tasks)),
        key=lambda t: -sum(_work(originals[i]) for i in tasks[t]) * (2 if t < len(sets) else 1),
    )
    outcomes: list[SharingFit | None] = [None] * len(sets)

    def fit_task(task: int, ghosts: list[GhostModule]) -> None:
        members = tasks[task]
        with _failing(min(members)):
            if task < len(sets):
                outcomes[task] = fit_group([originals[i] for i in members], ghosts, tolerance)
            else:
                _fit_layer(originals[members[0]], ghosts[0])
        for i in members:
            on_fitted(i)

    with _one_core_each(), ThreadPoolExecutor(max_workers=workers) as pool:
        index_of = {}
        try:
            for task in largest_first:
                ghosts = [build(i) for i in tasks[task]]
                index_of[pool.submit(fit_task, task, ghosts)] = min(tasks[task])
            finished, _ = wait(index_of, return_when=FIRST_EXCEPTION)
            if any(fitted.exception() is not None for fitted in finished):
                for fitted in index_of:
                    fitted.cancel()
                wait(index_of)  # the fits running end; of their failures, raise the first layer's
                failed = [i for fitted, i in index_of.items() if _failed(fitted)]
                next(fitted for fitted, i in index_of.items() if i == min(failed)).result()
        except BaseException:
            for fitted in index_of:
                fitted.cancel()
            raise
    return [outcome for outcome in outcomes if outcome is not None]


def _failed(fitted: Future) -> bool:
    return not fitted.cancelled() and fitted.exception() is not None


def _work(conv: nn.Module) -> int:
    """A layer's fitting work, roughly: its filters' Gram matrix (``out^2 * filter size``
    multiply-adds) and the slot assignment (cubic in the ghosts, half the filters). 0 for a
    layer without a usable weight (its fit then fails with the reason)."""
    try:
        out, *filter_shape = conv.weight.shape
    except (AttributeError, RuntimeError, ValueError):
        return 0
    return out * out * math.prod(filter_shape) + (out // 2) ** 3 // 4


@cache
def _thread_pools() -> ThreadpoolController:
    """The BLAS libraries loaded (numpy's and scipy's, by now), found once: finding them takes
    3 ms, and every conversion limits them."""
    return ThreadpoolController()


@contextmanager
def _one_core_each() -> Iterator[None]:
    """torch and numpy's BLAS on one thread each for the fit, both given back afterwards (the
    workers already fill the cores; nested thread pools would only contend)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with _thread_pools().limit(limits=1, user_api="blas"):
            yield
    finally:
        torch.set_num_threads(threads)


@contextmanager
def _failing(index: int) -> Iterator[None]:
    try:
        yield
    except ConfigError:
        raise
    except Exception as error:
        raise FitError(index) from error


@torch.no_grad()  # grad mode is per thread: this runs in a worker
def _fit_layer(original: nn.Module, ghost: GhostModule) -> None:
    """The data-free fit of ``ghost`` to ``original``, written into ``ghost``."""
    check_conv(original)
    kind = conv_kind(original, ghost)
    weight = kind.effective_weight(original).detach()
    kept = choose_kept(weight, ghost.groups, ghost.intrinsic_channels)
    slot_source = ghost.slot_source
    draft = draft_from(kept, slot_source, ghost.stride, ghost.dilation, ghost.dw_size)
    layout = finish_layout(draft, draft.assign())
    write_layout(original, ghost, kind, slot_source, layout)
