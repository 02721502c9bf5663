"""Per-layer joins of a deployed GhostModule: exact, eager-inference only, chosen by timing."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from strategies import conv_and_input, conv_nd_and_input  # tests/strategies.py
from test_deploy import Small, randomise_batchnorms  # tests/test_deploy.py
from torch import nn

import ghostify
from ghostify import ConfigError, GhostModule
from ghostify.deploy.forms import JOINS


def joined(ghost: GhostModule, x: torch.Tensor, join: str) -> torch.Tensor:
    ghost = copy.deepcopy(ghost)
    ghost.join = join
    with torch.no_grad():
        return ghost(x)


@given(
    st.one_of(conv_and_input(), st.sampled_from([1, 3]).flatmap(conv_nd_and_input)),
    st.booleans(),
    st.booleans(),
)
def test_every_join_computes_the_concatenation_exactly(case, bias: bool, channels_last) -> None:
    """Surplus slots, an intrinsic bias, 1/2/3-D, channels_last: bit for bit the same."""
    conv, x, ratio, dw_size = case
    ghost = GhostModule.from_conv(conv, ratio=ratio, dw_size=dw_size, init="scratch").eval()
    if dw_size == 1 and ghost.cheap_conv.bias is None:  # the one-pass affine write: its shift
        ghost.cheap_conv.bias = nn.Parameter(torch.randn(ghost.cheap_conv.out_channels))
    if bias:
        ghost.intrinsic_bias = torch.randn(ghost.intrinsic_channels)
    if channels_last and x.dim() == 4:
        ghost.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    want = joined(ghost, x, "cat")
    for join in JOINS:
        got = joined(ghost, x, join)
        assert torch.equal(got, want), join
        # One input channel is both layouts at once, and torch's convolutions then keep the
        # default one: the layout is only asked of an unambiguous input.
        if channels_last and x.dim() == 4 and ghost.intrinsic_channels > 1 and x.shape[1] > 1:
            assert got.is_contiguous(memory_format=torch.channels_last)


@given(conv_and_input(), st.booleans(), st.booleans())
def test_a_cheap_op_with_zero_outer_taps_becomes_pointwise_exactly(case, zero, channels_last):
    """Deploy makes such a cheap op 1x1 (one elementwise pass, the bias folded whole); a cheap
    op with any outer tap left is left as it is."""
    conv, x, ratio, _ = case
    ghost = GhostModule.from_conv(conv, ratio=ratio, dw_size=3, init="scratch")
    with torch.no_grad():
        ghost.cheap_conv.weight.mul_(3)
        if zero:
            centre = ghost.cheap_conv.weight[:, :, 1:2, 1:2].clone()
            ghost.cheap_conv.weight.zero_()[:, :, 1:2, 1:2] = centre
    model = randomise_batchnorms(nn.Sequential(ghost, nn.BatchNorm2d(conv.out_channels))).eval()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    with torch.no_grad():
        want = model(x)
        ghostify.deploy(model, x, join="buffer", memory_format="contiguous")
        got = model(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()) + 1e-6)
    record = ghostify.deploy_record(model)
    assert record.pointwise_cheap == (["0"] if zero else [])
    assert model[0].dw_size == model[0].cheap_conv.kernel_size[0] == (1 if zero else 3)
    if zero:
        assert model[0].intrinsic_bias is None  # the whole shift folded into the convolutions


def test_the_join_applies_to_eager_inference_only() -> None:
    ghost = GhostModule(8, 16, 3).eval()
    ghost.join = "buffer"
    x = torch.randn(2, 8, 10, 10)
    assert ghost(x).grad_fn is not None  # autograd: the concatenation (differentiable)
    with torch.no_grad():
        traced = torch.fx.symbolic_trace(ghost)
        torch.testing.assert_close(traced(x), ghost(x))
    assert "cat" in str(traced.code)


def test_deploy_times_each_layer_and_keeps_the_faster_join() -> None:
    torch.manual_seed(0)
    model = randomise_batchnorms(ghostify.convert(Small(), init="scratch")).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        want = model(x)
        ghostify.deploy(model, x)
        got = model(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    record = ghostify.deploy_record(model)
    ghosts = {n for n, m in model.named_modules() if isinstance(m, GhostModule)}
    assert set(record.joins) == ghosts and len(ghosts) == 2
    for name, choice in record.joins.items():
        assert set(choice.timings_ms) == set(JOINS)
        assert choice.join == min(choice.timings_ms, key=choice.timings_ms.get)
        assert model.get_submodule(name).join == choice.join
    assert "GhostModule joins" in str(record)


def test_a_named_join_is_applied_without_timing_and_a_bad_one_refused() -> None:
    model = ghostify.convert(Small(), init="scratch").eval()
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(ConfigError, match="join must be one of"):
        ghostify.deploy(copy.deepcopy(model), x, join="stack")
    ghostify.deploy(model, x, join="buffer")
    joins = ghostify.deploy_record(model).joins
    assert {c.join for c in joins.values()} == {"buffer"}
    assert not any(c.timings_ms for c in joins.values())


def test_a_failed_deploy_puts_the_joins_back(monkeypatch) -> None:
    model = ghostify.convert(Small(), init="scratch").eval()
    x = torch.randn(2, 3, 16, 16)
    deploy_module = sys.modules["ghostify.deploy"]  # the package (ghostify.deploy: the function)

    def fail(*_args, **_kwargs):
        raise ghostify.ConversionError("outputs differ")

    monkeypatch.setattr(deploy_module, "_check_outputs", fail)
    with pytest.raises(ghostify.ConversionError):
        ghostify.deploy(model, x, join="buffer")
    assert all(m.join == "cat" for m in model.modules() if isinstance(m, GhostModule))
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_a_deployed_checkpoint_keeps_each_layers_join(tmp_path) -> None:
    import torchvision

    from ghostify.io import checkpoint

    model = ghostify.convert(torchvision.models.resnet18(weights=None), init="scratch").eval()
    plan = ghostify.plan_of(model)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():  # the 1x1 layers' cheap ops are pointwise now: structure changes
        ghost = model.layer2[0].conv1
        ghost.cheap_conv.weight[:, :, [0, 2]] = 0
        ghost.cheap_conv.weight[:, :, :, [0, 2]] = 0
    ghostify.deploy(model, x, join="cat", memory_format="contiguous")
    assert ghostify.deploy_record(model).pointwise_cheap == ["layer2.0.conv1"]
    chosen = {
        name: ("buffer" if i % 2 else "cat")
        for i, name in enumerate(n for n, m in model.named_modules() if isinstance(m, GhostModule))
    }
    for name, join in chosen.items():
        model.get_submodule(name).join = ghostify.deploy_record(model).joins[name].join = join
    path = checkpoint.save_checkpoint(
        tmp_path / "d.pt",
        model,
        spec="torchvision:resnet18",
        plan=plan,
        deployed=ghostify.deploy_record(model),
    )
    loaded = checkpoint.load_model(checkpoint.load_checkpoint(path))
    assert {name: loaded.get_submodule(name).join for name in chosen} == chosen
    assert loaded.layer2[0].conv1.dw_size == 1
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
