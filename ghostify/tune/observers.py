"""``layer_statistics``: the layout sums of named convolutions of the *original* model, in one pass.

For the budget solver (``ghostify.budget``): every ratio's and ``dw_size``'s fit error can be read
off these sums without another forward pass. The original model is run once over the
calibration data (several times only when the sums of all the layers exceed the memory budget:
then the layers are split into groups that fit, one pass each), forward hooks adding each
layer's inputs and outputs to its ``LayerStatistics`` (targets = the layer's own outputs). The
sums are all-reduced across ranks; the model is left as it was.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..fit.statistics import MAX_PAIR_SUMS, WORKSPACE_BYTES, LayerStatistics
from ..inputs import eval_mode
from ..layers.conv_types import TORCH_CONVS
from ..options import check_dw_size
from . import distributed
from .memory import default_budget, refuse
from .settings import Calibration, as_calibration


def _convs(model: nn.Module, names: Sequence[str], dw_size: int) -> dict[str, nn.Module]:
    if isinstance(names, str) or not isinstance(names, Sequence) or not names:
        raise ConfigError(f"names must be a non-empty list of convolution names; got {names!r}")
    modules = dict(model.named_modules())
    convs: dict[str, nn.Module] = {}
    for name in names:
        module = modules.get(name)
        if not isinstance(module, tuple(TORCH_CONVS)):
            what = "no module" if module is None else f"a {type(module).__name__}"
            raise ConfigError(f"layer_statistics: {name!r} is {what}, not a convolution")
        taps = dw_size ** (module.weight.dim() - 2) + 1
        if module.out_channels**2 * taps > MAX_PAIR_SUMS:
            raise ConfigError(
                f"layer_statistics: {name!r} has {module.out_channels} output channels, too "
                f"many to choose a layout on activations ({module.out_channels}^2 x {taps} sums "
                f"> {MAX_PAIR_SUMS}); leave it out"
            )
        convs[name] = module
    return convs


def _groups(convs: dict[str, nn.Module], dw_size: int, refit: bool, budget: int) -> list[list[str]]:
    """The layers split into passes whose sums fit in ``budget`` together (in order)."""
    groups: list[list[str]] = [[]]
    used = WORKSPACE_BYTES
    for name, conv in convs.items():
        size = LayerStatistics.nbytes(conv, dw_size, refit)
        if size + WORKSPACE_BYTES > budget:
            raise refuse(name, size + WORKSPACE_BYTES, budget, "its statistics")
        if used + size > budget and groups[-1]:
            groups.append([])
            used = WORKSPACE_BYTES
        groups[-1].append(name)
        used += size
    return groups


@torch.no_grad()
def layer_statistics(
    model: nn.Module,
    names: Sequence[str],
    calibration: Calibration | Any,
    *,
    dw_size: int = 3,
    refit_intrinsic: bool = False,
) -> dict[str, LayerStatistics]:
    """``LayerStatistics`` of each convolution in ``names`` on the calibration data, by name.

    ``calibration``: a ``Calibration`` (its ``memory_budget``, ``layout_positions``,
    ``refit_positions_per_weight``, ``seed`` and ``progress`` apply) or calibration data as
    ``convert`` takes it. Targets are each layer's own outputs in the original model, so
    ``fit_on_activations(conv, ghost, stats)`` fits a ghost of it; with ``dw_size=3`` the centre
    tap of the sums is the ``dw_size=1`` case. A layer called several times sums every call.
    """
    check_dw_size(dw_size)
    convs = _convs(model, names, dw_size)
    calibration = as_calibration(calibration, model)
    batches = calibration.batches
    assert batches is not None
    device = distributed.collective_device(model)
    budget = distributed.min_over_ranks(calibration.memory_budget or default_budget(device), device)
    groups = _groups(convs, dw_size, refit_intrinsic, budget)
    samples = distributed.all_reduce_count(sum(len(x) for x, _ in batches), device)
    stats = {
        name: LayerStatistics(
            conv,
            dw_size=dw_size,
            refit_intrinsic=refit_intrinsic,
            sampling=calibration.sampling(name, conv, samples),
        )
        for name, conv in convs.items()
    }
    bar = distributed.progress_bar(
        [(g, b) for g in range(len(groups)) for b in range(len(batches))],
        calibration.progress,
        desc="layer statistics",
        unit="batch",
    )
    steps = iter(bar)
    with eval_mode(model):
        for group in groups:
            handles = [
                convs[name].register_forward_hook(
                    lambda _m, args, output, s=stats[name]: _observe(s, args[0], output)
                )
                for name in group
            ]
            try:
                for inputs, _ in batches:
                    model(inputs)
                    next(steps, None)
            finally:
                for handle in handles:
                    handle.remove()
    for name in convs:
        distributed.all_reduce_sum(stats[name].tensors())
    return stats


def _observe(stats: LayerStatistics, inputs: torch.Tensor, outputs: torch.Tensor) -> None:
    stats.add_sources(outputs, outputs)
    if stats.inputs is not None:
        stats.inputs.update(inputs, outputs)
