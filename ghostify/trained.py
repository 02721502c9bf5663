"""Does a model look trained? And the warning for converting one without calibration data.

A data-free conversion fits each ghost to the layer's filters alone. On a freshly initialised
model that is all there is to keep; on a trained one it loses much of what the network learnt
(measured on ghostify.testing.digits' CNN at 99% test accuracy: 29-39% after a data-free
conversion, 99% calibrated on 512 unlabeled training images; tests/test_cli_pipeline.py checks
both sides). So ``convert``
warns, once per call, when a model it fits data-free shows that it was trained.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .errors import TrainedWeightsWarning

CONSEQUENCE = (
    "a data-free conversion fits the new layers to the filters alone and loses much of what a "
    "trained network learnt (measured: a digits CNN at 99% test accuracy fell to 29-39%; "
    "calibrated on 512 unlabeled images it kept 99%)"
)
FIX = (
    "pass a few hundred unlabeled inputs: ghostify.convert(model, calibration_data=inputs), "
    'e.g. inputs = ghostify.load_calibration_data("images/", input_size=224)'
)


def _moved(bn: nn.modules.batchnorm._BatchNorm) -> bool:
    """True when a BatchNorm's running statistics left their initial values (mean 0, var 1)."""
    if bn.running_mean is None or bn.running_var is None:
        return False
    tracked = bn.num_batches_tracked
    if tracked is not None and int(tracked) > 0:
        return True
    return bool(bn.running_mean.count_nonzero() > 0 or (bn.running_var != 1).any())


@torch.no_grad()
def trained_evidence(model: nn.Module) -> str | None:
    """Why ``model`` looks trained, in words, or None when nothing shows it.

    The evidence read: BatchNorm running statistics away from their initial values (mean 0,
    variance 1, no batch tracked), which only a forward pass in training mode (or loading
    trained weights) changes. A model without BatchNorm shows nothing here; callers that know
    better (the command line, given ``--weights``) say so themselves.
    """
    norms = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm)
    ]
    moved = [name for name, module in norms if _moved(module)]
    if not moved:
        return None
    return (
        f"{len(moved)} of its {len(norms)} BatchNorm layers have running statistics away from "
        f"their initial values (mean 0, variance 1), e.g. {moved[0]!r}"
    )


def warn_if_trained(model: nn.Module, stacklevel: int = 3) -> None:
    """Warn (``TrainedWeightsWarning``) when ``model`` looks trained: it is about to be
    converted data-free. ``stacklevel`` 3 points at the caller of the function calling this."""
    evidence = trained_evidence(model)
    if evidence is not None:
        warnings.warn(
            f"converting without calibration_data a model that looks trained ({evidence}): "
            f"{CONSEQUENCE}. To keep it, {FIX}",
            TrainedWeightsWarning,
            stacklevel=stacklevel,
        )
