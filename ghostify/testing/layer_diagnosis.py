"""Where a converted network loses its original's outputs, layer by layer.

Shared by benchmarks/trained_networks.py (``--diagnose``) and its tests:

- ``layer_errors``: each converted layer's relative output error against the original's, along
  the network (earlier layers' errors included) and alone (on the original's inputs to it);
- ``rank_bounds``: how little redundancy a layer's output has, as the relative error of its
  best approximation by ``C / ratio`` channels and pointwise combinations of them.
"""

from __future__ import annotations

import torch
from torch import nn

from ..surgery.record import record_of


@torch.no_grad()
def layer_errors(
    original: nn.Module, converted: nn.Module, inputs: torch.Tensor, batch: int = 8
) -> dict[str, tuple[float, float]]:
    """Each converted layer's relative output error against the original model's layer.

    ``(along, local)`` per layer name: ``along`` on the inputs it gets in the converted model
    (the errors of earlier layers included), ``local`` on the original model's own inputs to the
    layer (its fit alone). Layers that run more than once are measured at their first call.
    Sums are taken ``batch`` samples at a time, so memory stays that of one small batch.
    """
    record = record_of(converted)
    orders = {
        row.name: torch.tensor(row.folded_into[0].index) for row in record.layers if row.folded_into
    }
    sums = {
        row.name: torch.zeros(3, dtype=torch.float64) for row in record.layers
    }  # along, local, |y|
    wanted: dict[str, torch.Tensor] = {}

    def teacher_hook(name: str):
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            if name in wanted:
                return
            target = out if name not in orders else out.index_select(1, orders[name])
            alone = converted.get_submodule(name)(args[0])  # before ``wanted``: its hook skips
            wanted[name] = target
            sums[name][1] += float((alone - target).double().square().sum())
            sums[name][2] += float(target.double().square().sum())

        return hook

    def student_hook(name: str):
        def hook(_module: nn.Module, _args: tuple, out: torch.Tensor) -> None:
            target = wanted.pop(name, None)
            if target is not None:
                sums[name][0] += float((out - target).double().square().sum())

        return hook

    handles = []
    for row in record.layers:
        handles.append(
            original.get_submodule(row.name).register_forward_hook(teacher_hook(row.name))
        )
        handles.append(
            converted.get_submodule(row.name).register_forward_hook(student_hook(row.name))
        )
    try:
        original.eval(), converted.eval()
        for start in range(0, len(inputs), batch):
            wanted.clear()
            original(inputs[start : start + batch])
            converted(inputs[start : start + batch])
    finally:
        for handle in handles:
            handle.remove()
    return {
        name: (
            float((total[0] / total[2].clamp_min(1e-30)).sqrt()),
            float((total[1] / total[2].clamp_min(1e-30)).sqrt()),
        )
        for name, total in sums.items()
    }


@torch.no_grad()
def rank_bounds(
    model: nn.Module, names: list[str], inputs: torch.Tensor, ratio: int, batch: int = 8
) -> dict[str, float]:
    """Relative error of the best rank-``C / ratio`` approximation of each layer's output.

    Over channels at each position (PCA of the uncentred outputs): how much of the layer's
    output a layer that computes only ``C / ratio`` channels exactly and the rest as *pointwise*
    combinations of them must lose. A ghost's cheap operation also mixes neighbouring
    positions, so this is a guide to the layer's redundancy, not a strict bound. The channel
    Gram matrices are summed ``batch`` samples at a time.
    """
    grams: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def accumulate(_m: nn.Module, _a: tuple, out: torch.Tensor) -> None:
            flat = out.detach().transpose(0, 1).flatten(1).double()
            grams[name] = grams.get(name, 0) + flat @ flat.T

        return accumulate

    handles = [model.get_submodule(name).register_forward_hook(hook(name)) for name in names]
    try:
        model.eval()
        for start in range(0, len(inputs), batch):
            model(inputs[start : start + batch])
    finally:
        for handle in handles:
            handle.remove()
    bounds = {}
    for name in names:
        energies = torch.linalg.eigvalsh(grams[name]).flip(0).clamp_min(0)
        kept = grams[name].shape[0] // ratio
        bounds[name] = float((energies[kept:].sum() / energies.sum().clamp_min(1e-30)).sqrt())
    return bounds
