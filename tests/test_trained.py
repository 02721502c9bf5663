"""Fitting on a network that really learnt something: a CNN trained on digits.

The fixture trains ghostify.testing.digits' CNN for 4 epochs with a linearly decaying learning
rate (about 10 s on one core; 99.2% test accuracy, the same as 15 epochs at a constant rate),
once per test run: xdist workers share it through a file.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ghostify import GhostModule, fit
from ghostify.testing import digits

Activations = dict[str, torch.Tensor]


def conv_inputs(model: nn.Module, images: torch.Tensor) -> Activations:
    """The input of every Conv2d of ``model`` on ``images``, by module name."""
    inputs: Activations = {}
    hooks = [
        module.register_forward_hook(lambda _m, args, _o, name=name: inputs.update({name: args[0]}))
        for name, module in model.named_modules()
        if isinstance(module, nn.Conv2d)
    ]
    with torch.no_grad():
        model.eval()(images)
    for hook in hooks:
        hook.remove()
    return inputs


def trained_cnn(tmp_path_factory: pytest.TempPathFactory) -> nn.Sequential:
    """The CNN trained once per run; xdist workers share one run's folder, and its weights."""
    return digits.shared_trained_cnn(tmp_path_factory.getbasetemp().parent)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[nn.Sequential, Activations, Activations]:
    """The trained CNN, its conv inputs on 256 training images, and on the 397 test images."""
    model = trained_cnn(tmp_path_factory)
    train_x, _, test_x, test_y = digits.load()
    assert digits.accuracy(model, test_x, test_y) > 0.95  # it did learn (measured 0.992)
    return model, conv_inputs(model, train_x[:256]), conv_inputs(model, test_x)


def ghost_mask(ghost: GhostModule) -> torch.Tensor:
    """Original output channels the cheap conv makes (the rest are exact copies)."""
    return ghost.output_position >= ghost.intrinsic_channels


def layer_error(conv: nn.Conv2d, ghost: GhostModule, x: torch.Tensor, ghosts_only: bool) -> float:
    """|ghost(x) - conv(x)| / |conv(x)|, over the ghost channels or the whole output."""
    with torch.no_grad():
        reference, output = conv(x), ghost(x)
    if ghosts_only:
        mask = ghost_mask(ghost)
        reference, output = reference[:, mask], output[:, mask]
    return float((output - reference).norm() / reference.norm())


def scaled_copy_error(conv: nn.Conv2d, ghost: GhostModule, x: torch.Tensor) -> float:
    """Ghost-channel error of the simplest data-free guess on the fitted layer's own layout.

    Each ghost channel ``g`` becomes ``a * (conv(x)[s] - bias[s]) + bias[g]``, where ``s`` is the
    kept channel the fit chose as its source and ``a`` the least-squares scale of filter ``s``
    onto filter ``g`` (weights only): a depthwise kernel with its centre tap alone.
    """
    weight, bias = conv.weight.detach().flatten(1), conv.bias.detach()
    position, m = ghost.output_position, ghost.intrinsic_channels
    kept_at = torch.empty(m, dtype=torch.long)  # original channel at each primary output
    kept_at[position[position < m]] = torch.nonzero(position < m).flatten()
    ghosts = torch.nonzero(ghost_mask(ghost)).flatten()
    source = kept_at[ghost.slot_source[position[ghosts] - m]]
    scale = (weight[ghosts] * weight[source]).sum(1) / weight[source].square().sum(1)
    with torch.no_grad():
        reference = conv(x)
    guess = scale[:, None, None] * (reference[:, source] - bias[source, None, None])
    guess = guess + bias[ghosts, None, None]
    return float((guess - reference[:, ghosts]).norm() / reference[:, ghosts].norm())


def assert_intrinsic_exact(conv: nn.Conv2d, ghost: GhostModule, x: torch.Tensor) -> None:
    with torch.no_grad():
        kept = ghost.intrinsic_index
        torch.testing.assert_close(ghost(x)[:, kept], conv(x)[:, kept])


LAYERS = ["3", "7", "10"]  # the three 64-channel convs (the 1-channel stem has no ghosts to fit)


@pytest.mark.parametrize("name", LAYERS)
def test_data_free_fit_beats_a_scaled_copy_and_scratch(trained, name: str) -> None:
    model, _, held_out = trained
    conv, x = model.get_submodule(name), held_out[name]
    fitted = GhostModule.from_conv(conv, init="weights")
    scratch = GhostModule.from_conv(conv, init="scratch")
    assert_intrinsic_exact(conv, fitted, x)
    # The fitted 3x3 kernel contains the scaled copy (its centre tap) and is the least-squares
    # optimum over all nine taps on the filters, so on real activations it must do better than
    # the copy from the same source. No margin beyond strictness: measured 0.926 vs 0.962,
    # 0.962 vs 0.966, 0.705 vs 0.767 (layers 3, 7, 10), and better in all 12 layer-seed pairs
    # over training seeds 0-3 (gaps 0.004-0.057). Both are under 1.0, the all-zero guess.
    fitted_error = layer_error(conv, fitted, x, ghosts_only=True)
    assert fitted_error < scaled_copy_error(conv, fitted, x) < 1.0
    # Whole layer against PyTorch's default init: measured 0.46-0.67 vs 1.03-1.17 (seeds 0-3);
    # 0.75 leaves room for another seed and still needs the fit to remove a quarter of the error.
    whole_fitted = layer_error(conv, fitted, x, ghosts_only=False)
    whole_scratch = layer_error(conv, scratch, x, ghosts_only=False)
    assert whole_fitted < 0.75 * whole_scratch, (whole_fitted, whole_scratch)


@pytest.mark.parametrize("name", LAYERS)
def test_fitting_on_activations_beats_the_data_free_fit(trained, name: str) -> None:
    model, seen, held_out = trained
    conv = model.get_submodule(name)
    data_free = GhostModule.from_conv(conv, init="weights")
    refitted = fit(conv, GhostModule.like(conv), activations=seen[name])
    for x in (seen[name], held_out[name]):
        assert_intrinsic_exact(conv, refitted, x)
    # On the activations it was fitted to, the least-squares refit is optimal over the cheap
    # kernels and biases of the same layout, of which the data-free ones are one choice: it
    # cannot be worse. 0.9 asks for a clear gain: measured ratios 0.73, 0.58, 0.84 (layers 3,
    # 7, 10); on the held-out test images 0.73, 0.58, 0.86, so the gain is not overfitting.
    for x in (seen[name], held_out[name]):
        refit_error = layer_error(conv, refitted, x, ghosts_only=True)
        data_free_error = layer_error(conv, data_free, x, ghosts_only=True)
        assert refit_error < 0.9 * data_free_error, (refit_error, data_free_error)
