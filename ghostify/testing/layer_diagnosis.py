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
def layer_errors(original: nn.Module, converted: nn.Module, inputs: torch.Tensor) -> dict:
    """Each converted layer's relative output error against the original model's layer.

    ``(along, local)`` per layer name: ``along`` on the inputs it gets in the converted model
    (the errors of earlier layers included), ``local`` on the original model's own inputs to the
    layer (its fit alone). Layers that run more than once are measured at their first call.
    """
    record = record_of(converted)
    seen: dict[str, dict[str, torch.Tensor]] = {"student": {}, "teacher": {}, "inputs": {}}

    def keep(store: str, name: str):
        return lambda _m, args, out: seen[store].setdefault(name, out.detach())

    handles = []
    for row in record.layers:
        handles.append(
            converted.get_submodule(row.name).register_forward_hook(keep("student", row.name))
        )
        module = original.get_submodule(row.name)
        handles.append(module.register_forward_hook(keep("teacher", row.name)))
        handles.append(
            module.register_forward_pre_hook(
                lambda _m, args, name=row.name: seen["inputs"].setdefault(name, args[0].detach())
            )
        )
    try:
        original.eval(), converted.eval()
        converted(inputs)
        original(inputs)
    finally:
        for handle in handles:
            handle.remove()
    errors = {}
    for row in record.layers:
        wanted = seen["teacher"][row.name]
        if row.folded_into:  # the layer computes its channels in the order its consumers absorbed
            wanted = wanted.index_select(1, torch.tensor(row.folded_into[0].index))
        alone = converted.get_submodule(row.name)(seen["inputs"][row.name])
        scale = wanted.norm().clamp_min(1e-12)
        errors[row.name] = (
            float((seen["student"][row.name] - wanted).norm() / scale),
            float((alone - wanted).norm() / scale),
        )
    return errors


@torch.no_grad()
def rank_bounds(model: nn.Module, names: list[str], inputs: torch.Tensor, ratio: int) -> dict:
    """Relative error of the best rank-``C / ratio`` approximation of each layer's output.

    Over channels at each position (PCA of the uncentred outputs): how much of the layer's
    output a layer that computes only ``C / ratio`` channels exactly and the rest as *pointwise*
    combinations of them must lose. A ghost's cheap operation also mixes neighbouring
    positions, so this is a guide to the layer's redundancy, not a strict bound.
    """
    outputs: dict[str, torch.Tensor] = {}
    handles = [
        model.get_submodule(name).register_forward_hook(
            lambda _m, _a, out, name=name: outputs.__setitem__(name, out.detach())
        )
        for name in names
    ]
    try:
        model.eval()
        model(inputs)
    finally:
        for handle in handles:
            handle.remove()
    bounds = {}
    for name in names:
        flat = outputs[name].transpose(0, 1).flatten(1).double()
        energies = torch.linalg.eigvalsh(flat @ flat.T).flip(0).clamp_min(0)
        kept = flat.shape[0] // ratio
        bounds[name] = float((energies[kept:].sum() / energies.sum().clamp_min(1e-30)).sqrt())
    return bounds
