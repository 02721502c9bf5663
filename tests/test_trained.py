"""init="weights" on a network that really learnt something: a CNN trained on digits."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from ghostify import GhostModule

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import digits  # benchmarks/ is not a package: imported from its folder


@pytest.fixture(scope="module")
def trained() -> tuple[nn.Sequential, dict[str, torch.Tensor]]:
    model, (_, _, test_x, test_y) = digits.trained_cnn()
    assert digits.accuracy(model, test_x, test_y) > 0.95  # it did learn
    inputs: dict[str, torch.Tensor] = {}
    hooks = [
        module.register_forward_hook(lambda _m, args, _o, name=name: inputs.update({name: args[0]}))
        for name, module in model.named_modules()
        if isinstance(module, nn.Conv2d)
    ]
    with torch.no_grad():
        model.eval()(test_x[:128])
    for hook in hooks:
        hook.remove()
    return model, inputs


def layer_error(conv: nn.Conv2d, ghost: GhostModule, x: torch.Tensor, ghosts_only: bool) -> float:
    with torch.no_grad():
        reference, output = conv(x), ghost(x)
    if ghosts_only:
        mask = ghost.output_position >= ghost.intrinsic_channels
        reference, output = reference[:, mask], output[:, mask]
    return float((output - reference).norm() / reference.norm())


@pytest.mark.parametrize("name", ["3", "7", "10"])
def test_fitted_layers_beat_scratch_on_real_activations(trained, name: str) -> None:
    model, inputs = trained
    conv, x = model.get_submodule(name), inputs[name]
    fitted = GhostModule.from_conv(conv, init="weights")
    scratch = GhostModule.from_conv(conv, init="scratch")
    with torch.no_grad():
        kept = fitted.intrinsic_index
        torch.testing.assert_close(fitted(x)[:, kept], conv(x)[:, kept])
    # Zero output has error 1.0; the fitted ghosts must do better than that and than scratch.
    assert layer_error(conv, fitted, x, ghosts_only=True) < 0.97
    whole_fitted = layer_error(conv, fitted, x, ghosts_only=False)
    whole_scratch = layer_error(conv, scratch, x, ghosts_only=False)
    assert whole_fitted < 0.75 * whole_scratch, (whole_fitted, whole_scratch)
