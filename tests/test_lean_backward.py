"""The training forward's lean backward (GhostFunction): autograd's gradients, less memory."""

from __future__ import annotations

import copy
import warnings

import torch
import torchvision
from hypothesis import given
from hypothesis import strategies as st
from strategies import conv_and_input, conv_nd_and_input  # tests/strategies.py
from torch import nn

import ghostify
from ghostify import GhostModule
from ghostify.testing.memory import graph_saved_bytes


def plain_reference():
    """A context in which GhostModules run their plain ops: any saved-tensor hook disables the
    lean function (checkpointing and offloading must see every saved tensor)."""
    return torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)


def ran_lean(output: torch.Tensor) -> bool:
    return type(output.grad_fn).__name__ == "GhostFunctionBackward"


def gradients(module: nn.Module, x: torch.Tensor, after, weight: torch.Tensor):
    """The module's output (whether it ran lean, its value) and the gradients."""
    out = module(x)
    lean = ran_lean(out)
    out = after(out)
    inputs = [t for t in (x, *module.parameters()) if t.requires_grad]
    return lean, out, torch.autograd.grad(out, inputs, weight)


def randomise(ghost: GhostModule, data, dims: int) -> None:
    """Draw the optional parts: a cheap bias, an intrinsic bias (as deploy leaves), frozen
    parameters."""
    with torch.no_grad():
        if data.draw(st.booleans(), label="cheap bias"):
            ghost.cheap_conv.bias = nn.Parameter(torch.randn(ghost.cheap_conv.out_channels))
        if data.draw(st.booleans(), label="intrinsic bias"):
            ghost.intrinsic_bias = torch.randn(ghost.intrinsic_channels)
        ghost.cheap_conv.weight.mul_(3)  # scratch ghosts are small: make them matter
    for param in ghost.parameters():
        param.requires_grad_(data.draw(st.booleans(), label="requires grad"))


def check_gradients_equal(conv: nn.Module, x: torch.Tensor, ratio, dw_size, data) -> None:
    init = data.draw(st.sampled_from(["weights", "scratch"]), label="init")
    ghost = GhostModule.from_conv(conv, ratio=ratio, dw_size=dw_size, init=init)
    randomise(ghost, data, x.dim() - 2)
    x = x.clone().requires_grad_(data.draw(st.booleans(), label="input grad"))
    if not x.requires_grad and not any(p.requires_grad for p in ghost.parameters()):
        return
    inplace = data.draw(st.booleans(), label="in-place ReLU after")
    after = (lambda t: torch.relu_(t)) if inplace else (lambda t: t * 1.0)
    weight = torch.randn(ghost(x).shape)
    lean, out, got = gradients(ghost, x, after, weight)
    assert lean
    with plain_reference():
        lean, ref_out, want = gradients(copy.deepcopy(ghost), x, after, weight)
    assert not lean
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@given(conv_and_input(), st.data())
def test_gradients_equal_autograd_on_the_plain_form(case, data) -> None:
    """Stride, dilation, groups, biases, padding modes and 'same'/'valid', surplus slots, a kept
    channel order (fitted modules), an intrinsic bias, frozen parameters, an in-place ReLU."""
    conv, x, ratio, dw_size = case
    check_gradients_equal(conv, x, ratio, dw_size, data)


@given(st.sampled_from([1, 3]).flatmap(lambda dims: conv_nd_and_input(dims)), st.data())
def test_gradients_equal_autograd_in_1d_and_3d(case, data) -> None:
    conv, x, ratio, dw_size = case
    check_gradients_equal(conv, x, ratio, dw_size, data)


def test_the_lean_function_runs_only_in_eager_training() -> None:
    ghost = GhostModule(8, 16, 3)
    x = torch.randn(2, 8, 10, 10)
    assert ran_lean(ghost(x))
    with torch.no_grad():
        assert ghost(x).grad_fn is None
    with plain_reference():
        assert not ran_lean(ghost(x))
    handle = ghost.primary_conv.register_forward_hook(lambda *args: None)
    assert not ran_lean(ghost(x))  # a hook on a part must see it run
    handle.remove()
    frozen = copy.deepcopy(ghost).requires_grad_(False)
    assert frozen(x).grad_fn is None
    traced = torch.fx.symbolic_trace(ghost)  # traced as its plain ops
    torch.testing.assert_close(traced(x), ghost(x))
    seed_style = GhostModule(8, 16, 3, batch_norm=True, relu=True)
    assert not ran_lean(seed_style(x))


def test_in_place_change_of_the_output_recomputes_the_intrinsic_half() -> None:
    """After ReLU(inplace=True) the output no longer holds the intrinsic half: backward must not
    read it from there (the gradients would be those of relu(intrinsic))."""
    ghost = GhostModule(4, 8, 3, dw_size=3)
    with torch.no_grad():
        ghost.primary_conv.weight.normal_()
        ghost.cheap_conv.weight.normal_()
    x = torch.randn(2, 4, 7, 7)
    model = nn.Sequential(ghost, nn.ReLU(inplace=True))
    got = torch.autograd.grad(model(x).sum(), ghost.cheap_conv.weight)[0]
    with plain_reference():
        want = torch.autograd.grad(model(x).sum(), ghost.cheap_conv.weight)[0]
    torch.testing.assert_close(got, want)
    assert (model(x) == 0).any()  # the ReLU did change negative values


def test_double_backward_equals_the_plain_form() -> None:
    ghost = GhostModule.from_conv(nn.Conv2d(6, 9, 3, padding=1, bias=True), ratio=3)
    x = torch.randn(2, 6, 8, 8, requires_grad=True)

    def penalty(module: nn.Module) -> torch.Tensor:  # a gradient penalty, as WGAN-GP uses
        (grad_x,) = torch.autograd.grad(module(x).square().sum(), x, create_graph=True)
        return torch.autograd.grad(grad_x.square().sum(), list(module.parameters()))

    got = penalty(ghost)
    with plain_reference():
        want = penalty(ghost)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_autocast_bf16_gradients_match_the_plain_form() -> None:
    ghost = GhostModule(8, 16, 3)
    x = torch.randn(2, 8, 10, 10, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ghost(x)
        assert out.dtype == torch.bfloat16 and ran_lean(out)
        got = torch.autograd.grad(out.float().square().sum(), [x, *ghost.parameters()])
        with plain_reference():
            want = torch.autograd.grad(ghost(x).float().square().sum(), [x, *ghost.parameters()])
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


def test_a_training_step_saves_no_more_than_the_original() -> None:
    """ResNet-18: what the graph keeps for backward, counted exactly, parameters left out."""
    original = torchvision.models.resnet18(num_classes=10).train()
    converted = ghostify.convert(copy.deepcopy(original), init="scratch", progress=False)
    x = torch.randn(2, 3, 64, 64)

    def saved(model: nn.Module) -> int:
        return graph_saved_bytes(model(x), exclude=list(model.parameters()))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        original_bytes, lean_bytes = saved(original), saved(converted)
        with plain_reference():  # the plain ops keep every intrinsic half as well
            plain_bytes = saved(converted)
    assert lean_bytes <= original_bytes < plain_bytes


def test_checkpointed_ghost_modules_run_plain_and_agree() -> None:
    from torch.utils.checkpoint import checkpoint

    block = nn.Sequential(GhostModule(8, 16, 3), nn.BatchNorm2d(16), nn.ReLU(inplace=True))
    x = torch.randn(2, 8, 10, 10, requires_grad=True)
    got = torch.autograd.grad(checkpoint(block, x, use_reentrant=False).sum(), x)[0]
    want = torch.autograd.grad(block(x).sum(), x)[0]
    torch.testing.assert_close(got, want)


def test_a_converted_model_moves_to_meta_and_back_and_runs_in_bf16() -> None:
    """The device-agnostic path: nothing in a converted model is tied to the CPU."""
    original = torchvision.models.resnet18(num_classes=10)
    model = ghostify.convert(original, init="scratch", progress=False).eval()
    state = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
    model.to("meta")
    assert all(p.is_meta for p in model.parameters())
    assert model(x.to("meta")).shape == want.shape
    model.to_empty(device="cpu").load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(model(x), want)
        half = copy.deepcopy(model).to(torch.bfloat16)(x.to(torch.bfloat16))
    assert half.dtype == torch.bfloat16
    assert (half.float() - want).abs().max() < 0.05 * want.abs().max()
    train = copy.deepcopy(model).train().to(torch.bfloat16)
    out = train(x.to(torch.bfloat16))
    out.float().square().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in train.parameters())
