"""GhostModule.from_conv: shape-exact for every Conv2d configuration, trainable, faithful."""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from strategies import conv_and_input  # tests/strategies.py
from torch import nn

import ghostify
from ghostify import ConfigError, GhostModule, fit


@given(conv_and_input(), st.sampled_from(["weights", "scratch"]))
def test_output_shape_matches_for_any_conv(case, init: str) -> None:
    conv, x, ratio, dw_size = case
    ghost = GhostModule.from_conv(conv, ratio=ratio, dw_size=dw_size, init=init)
    assert ghost(x).shape == conv(x).shape
    # The shape must also hold for other input sizes than the one the case was drawn with.
    bigger = torch.randn(1, x.shape[1], x.shape[2] + 3, x.shape[3] + 5)
    assert ghost(bigger).shape == conv(bigger).shape


@given(conv_and_input())
def test_intrinsic_channels_are_reproduced_exactly(case) -> None:
    conv, x, ratio, dw_size = case
    ghost = GhostModule.from_conv(conv, ratio=ratio, dw_size=dw_size)
    kept = ghost.intrinsic_index  # original channels made by the primary conv
    assert kept.numel() == ghost.intrinsic_channels
    torch.testing.assert_close(ghost(x)[:, kept], conv(x)[:, kept], rtol=1e-5, atol=1e-5)


@given(conv_and_input())
def test_gradients_reach_every_parameter(case) -> None:
    conv, x, ratio, dw_size = case
    ghost = GhostModule.from_conv(conv, ratio=ratio, dw_size=dw_size, init="scratch")
    ghost(x).square().sum().backward()
    for name, param in ghost.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
    assert any(p.grad.abs().sum() > 0 for p in ghost.cheap_conv.parameters())


@given(conv_and_input())
def test_conversion_and_forward_are_deterministic(case) -> None:
    conv, x, ratio, dw_size = case
    first = GhostModule.from_conv(conv, ratio=ratio, dw_size=dw_size)
    second = GhostModule.from_conv(conv, ratio=ratio, dw_size=dw_size)
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert torch.equal(first(x), second(x))


@given(conv_and_input())
def test_parameter_count_follows_the_ghost_formula(case) -> None:
    """The primary conv at ceil(out/s) channels (rounded up to the groups) plus a depthwise conv
    with ceil(ghosts / intrinsic) kernels per intrinsic channel (the gather-free layout)."""
    conv, _, ratio, dw_size = case
    ghost = GhostModule.from_conv(conv, ratio=ratio, dw_size=dw_size)
    g = conv.groups
    per_group = conv.out_channels // g
    # Each group keeps the smallest divisor of its width that reaches ceil(width / ratio).
    kept = min(k for k in range(1, per_group + 1) if per_group % k == 0 and k * ratio >= per_group)
    intrinsic = math.ceil(conv.out_channels / ratio) if g == 1 else kept * g
    kh, kw = conv.kernel_size
    slots = intrinsic * math.ceil((conv.out_channels - intrinsic) / intrinsic)
    expected = intrinsic * (conv.in_channels // g) * kh * kw + slots * dw_size**2
    if conv.bias is not None:
        expected += intrinsic + slots
    assert sum(p.numel() for p in ghost.parameters()) == expected


def redundant_conv(out_channels: int = 32, in_channels: int = 16, bases: int = 6) -> nn.Conv2d:
    """A conv whose filters are scaled copies of a few base filters plus noise: the redundancy
    between feature maps that the GhostNet paper observes in trained networks."""
    conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
    base = torch.randn(bases, in_channels, 3, 3)
    scale = (0.5 + torch.rand(out_channels, 1, 1, 1)) * torch.where(
        torch.rand(out_channels, 1, 1, 1) < 0.5, -1.0, 1.0
    )
    noise = 0.05 * torch.randn(out_channels, in_channels, 3, 3)
    with torch.no_grad():
        conv.weight.copy_(base[torch.arange(out_channels) % bases] * scale + noise)
    return conv


def relative_error(conv: nn.Module, ghost: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        reference = conv(x)
        return float((ghost(x) - reference).norm() / reference.norm())


def test_weights_init_is_far_closer_than_scratch() -> None:
    conv = redundant_conv()
    x = torch.randn(4, 16, 24, 24)
    fitted = relative_error(conv, GhostModule.from_conv(conv, init="weights"), x)
    scratch = relative_error(conv, GhostModule.from_conv(conv, init="scratch"), x)
    assert fitted < 0.25 * scratch, (fitted, scratch)
    assert fitted < 0.3


def test_weights_init_recovers_exact_scaled_copies() -> None:
    """Filters that are exact multiples of kept ones are representable: the fit must find them."""
    conv = nn.Conv2d(8, 16, 3, padding=1, bias=True)
    with torch.no_grad():
        base = torch.randn(8, 8, 3, 3)
        conv.weight.copy_(torch.cat([base, -2.5 * base]))
        conv.bias.normal_()
    ghost = GhostModule.from_conv(conv)
    x = torch.randn(2, 8, 12, 12)
    torch.testing.assert_close(ghost(x), conv(x), rtol=1e-4, atol=1e-4)


@settings(max_examples=60, deadline=None)
@given(conv_and_input(), st.integers(1, 3), st.integers(0, 2), st.randoms(use_true_random=False))
def test_families_of_scaled_copies_are_fitted_exactly_for_any_conv(
    case, bases: int, drop: int, rng
) -> None:
    """Each group's filters come in families of ``ratio`` scaled copies of a base filter, in
    shuffled order. Every ghost is then a kept filter times a number, which the fit must find
    for every layout, stride, dilation, padding, bias and cheap-kernel size: the outputs match
    the conv's. With one group, the last family may be ``drop`` copies short: the module then
    has surplus slots, which are its last kept filter's, so that family's filters come last."""
    conv, x, ratio, dw_size = case
    groups, per_group_in = conv.groups, conv.in_channels // conv.groups
    size = per_group_in * math.prod(conv.kernel_size)  # a filter's length
    bases = min(bases, size)  # as many distinct directions as the filters have room for
    drop = min(drop, ratio - 1, bases - 1) if groups == 1 else 0
    per_group_out = bases * ratio - drop
    exact = nn.Conv2d(
        conv.in_channels,
        groups * per_group_out,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        groups,
        conv.bias is not None,
        conv.padding_mode,
    )
    filters = []
    for _ in range(groups):
        # Orthogonal bases: two nearly parallel ones would be one family in float32.
        generator = torch.Generator().manual_seed(rng.randrange(2**32))
        gaussian = torch.randn(size, bases, generator=generator)
        base = torch.linalg.qr(gaussian).Q.T.reshape(bases, per_group_in, *conv.kernel_size)
        family = [b for b in range(bases - 1) for _ in range(ratio)]
        rng.shuffle(family)
        family += [bases - 1] * (ratio - drop)
        scale = torch.tensor([rng.uniform(0.5, 2.0) * rng.choice([-1, 1]) for _ in family])
        filters.append(base[family] * scale.view(-1, 1, 1, 1))
    with torch.no_grad():
        exact.weight.copy_(torch.cat(filters))
    ghost = GhostModule.from_conv(exact, ratio=ratio, dw_size=dw_size)
    assert ghost.intrinsic_channels == groups * bases
    with torch.no_grad():
        want = exact(x)
        torch.testing.assert_close(ghost(x), want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


@settings(max_examples=60, deadline=None)
@given(conv_and_input(), st.data())
def test_each_group_stays_on_its_own_inputs(case, data) -> None:
    """A grouped conv's output channels of one group never see another group's inputs; the
    GhostModule standing for it must keep that, ghost channels included, for every layout."""
    conv, x, ratio, dw_size = case
    assume(conv.groups > 1)
    ghost = GhostModule.from_conv(conv, ratio=ratio, dw_size=dw_size).eval()
    group = data.draw(st.integers(0, conv.groups - 1))
    width_in, width_out = conv.in_channels // conv.groups, conv.out_channels // conv.groups
    changed = x.clone()
    changed[:, group * width_in : (group + 1) * width_in] = torch.randn_like(
        changed[:, group * width_in : (group + 1) * width_in]
    )
    others = [c for c in range(conv.out_channels) if c // width_out != group]
    with torch.no_grad():
        torch.testing.assert_close(ghost(changed)[:, others], ghost(x)[:, others])


def test_stride_and_dilation_fit_shifted_filters() -> None:
    """A ghost filter that is a kept filter shifted by one output step (stride 2) is recovered by
    the cheap kernel's off-centre tap, away from the border."""
    conv = nn.Conv2d(4, 8, 1, stride=2, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.cat([torch.randn(4, 4, 1, 1), torch.zeros(4, 4, 1, 1)]))
    ghost = GhostModule.from_conv(conv)
    x = torch.randn(1, 4, 16, 16)
    torch.testing.assert_close(ghost(x), conv(x), rtol=1e-5, atol=1e-5)


def test_state_carries_over_device_dtype_training_and_requires_grad() -> None:
    conv = nn.Conv2d(8, 16, 3, padding=1, bias=True).double().eval()
    conv.weight.requires_grad_(False)
    ghost = GhostModule.from_conv(conv)
    assert not ghost.training
    assert all(p.dtype == torch.float64 for p in ghost.parameters())
    assert not ghost.primary_conv.weight.requires_grad
    assert not ghost.cheap_conv.weight.requires_grad
    assert ghost.primary_conv.bias.requires_grad and ghost.cheap_conv.bias.requires_grad
    assert ghost.conv_config() == {
        "in_channels": 8,
        "out_channels": 16,
        "kernel_size": [3, 3],
        "stride": [1, 1],
        "padding": [1, 1],
        "dilation": [1, 1],
        "groups": 1,
        "bias": True,
        "padding_mode": "zeros",
    }


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_an_empty_module_skips_only_the_random_initialisation(dims: int) -> None:
    settings = dict(kernel_size=3, ratio=3, stride=2, groups=2, bias=True, dtype=torch.float64)
    torch.manual_seed(0)
    empty = GhostModule._for_dims(dims)(8, 20, **settings, empty=True)
    full = GhostModule._for_dims(dims)(8, 20, **settings)
    assert str(empty) == str(full)  # the same layers with the same settings
    for (name, got), (_, want) in zip(
        empty.named_parameters(), full.named_parameters(), strict=True
    ):
        assert (got.shape, got.dtype, got.requires_grad) == (want.shape, want.dtype, True), name
    # The layers are ordinary ones afterwards: they can be initialised, and draw the same
    # numbers as the eagerly initialised module did.
    assert "reset_parameters" not in vars(empty.primary_conv)
    torch.manual_seed(0)
    empty.primary_conv.reset_parameters()
    empty.cheap_conv.reset_parameters()
    for got, want in zip(empty.parameters(), full.parameters(), strict=True):
        torch.testing.assert_close(got, want)
    # Built empty and fitted, as convert does, it equals the module fitted after a random init.
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims](8, 20, 3, padding=1)
    fitted = GhostModule.from_conv(conv)
    blank = GhostModule.like(conv, empty=True)
    fit(conv, blank)
    for got, want in zip(blank.state_dict().values(), fitted.state_dict().values(), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_linear_by_default_and_seed_style_on_request() -> None:
    linear = GhostModule(8, 16, 3)
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.ReLU)) for m in linear.modules())
    seed_style = GhostModule(8, 16, 3, batch_norm=True, relu=True)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in seed_style.modules()) == 2
    assert (seed_style(torch.randn(2, 8, 10, 10)) >= 0).all()
    # With BN after both convs, a conv bias would be redundant: none is registered.
    assert seed_style.primary_conv.bias is None and seed_style.cheap_conv.bias is None


def test_state_dict_travels_the_channel_mapping() -> None:
    conv = redundant_conv()
    fitted = GhostModule.from_conv(conv)
    blank = GhostModule.from_conv(conv, init="scratch")
    assert fitted.channel_order is not None and blank.channel_order is None
    assert "channel_order" in fitted.state_dict() and "channel_order" not in blank.state_dict()
    blank.load_state_dict(fitted.state_dict())
    x = torch.randn(1, 16, 9, 9)
    assert torch.equal(blank(x), fitted(x))
    # And back: a state_dict without a gather drops it.
    fitted.load_state_dict(GhostModule.from_conv(conv, init="scratch").state_dict())
    assert fitted.channel_order is None


@pytest.mark.parametrize("ratio", [1, 0, 2.0, True, "2", None])
def test_bad_ratio_is_named(ratio: object) -> None:
    with pytest.raises(ConfigError, match=r"ratio must be an int >= 2.*got"):
        GhostModule.from_conv(nn.Conv2d(4, 8, 3), ratio=ratio)


@pytest.mark.parametrize("dw_size", [0, 2, 4, -1, 3.0, False])
def test_bad_dw_size_is_named(dw_size: object) -> None:
    with pytest.raises(ConfigError, match=r"dw_size must be an odd int >= 1.*got"):
        GhostModule.from_conv(nn.Conv2d(4, 8, 3), dw_size=dw_size)


def test_bad_init_and_non_conv_are_named() -> None:
    with pytest.raises(ConfigError, match="init must be one of"):
        GhostModule.from_conv(nn.Conv2d(4, 8, 3), init="random")
    with pytest.raises(ConfigError, match="expected an nn.Conv1d, nn.Conv2d or nn.Conv3d, got Li"):
        GhostModule.from_conv(nn.Linear(4, 8))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_weight_is_named_before_the_fit(bad: float) -> None:
    conv = nn.Conv2d(4, 8, 3)
    with torch.no_grad():
        conv.weight[3, 1, 0, 2] = bad
    with pytest.raises(ValueError, match="has 1 NaN or infinite value.s. of 288"):
        GhostModule.from_conv(conv)
    GhostModule.from_conv(conv, init="scratch")  # nothing to fit: built as asked
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), conv)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ghostify.ConversionError, match="'2' failed; the model is unchanged.*NaN"):
        ghostify.convert(model, progress=False)
    assert isinstance(model[2], nn.Conv2d)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], equal_nan=True)


def test_uninitialised_lazy_conv_asks_for_a_forward_pass() -> None:
    with pytest.raises(ConfigError, match="forward pass"):
        GhostModule.from_conv(nn.LazyConv2d(8, 3))


def test_too_few_channels_for_a_ghost_is_explained() -> None:
    with pytest.raises(ConfigError, match="leaves no ghost channels"):
        GhostModule(4, 4, 3, groups=4)


@given(st.integers(1, 8).flatmap(lambda n: st.permutations(range(2 * n))), st.data())
def test_channel_order_must_be_a_permutation(permutation: list[int], data) -> None:
    """A permutation is taken (an identity removes the gather); a duplicated, out-of-range,
    missing or extra channel is refused by name, and the order already set stays."""
    size = len(permutation)
    ghost = GhostModule(4, size, 1)
    kept = torch.arange(size).flip(0)
    ghost.set_channel_order(kept)
    flaw = data.draw(st.sampled_from(["none", "duplicate", "negative", "too big", "short", "long"]))
    order = list(permutation)
    spot = data.draw(st.integers(0, size - 1))
    if flaw == "duplicate":
        order[spot] = order[(spot + 1) % size]
    elif flaw == "negative":
        order[spot] = -1
    elif flaw == "too big":
        order[spot] = size
    elif flaw == "short":
        del order[spot]
    elif flaw == "long":
        order.append(order[spot])
    if flaw == "none":
        ghost.set_channel_order(torch.tensor(order))
        assert (ghost.channel_order is None) == (order == list(range(size)))
        if ghost.channel_order is not None:
            assert ghost.channel_order.tolist() == order
    else:
        with pytest.raises(ConfigError, match=rf"permutation of range\({size}\); got"):
            ghost.set_channel_order(torch.tensor(order, dtype=torch.long))
        assert torch.equal(ghost.channel_order, kept)


@given(st.integers(2, 12).flatmap(lambda n: st.permutations(range(n))))
def test_the_fits_own_order_setter_agrees_with_the_checked_one(permutation: list[int]) -> None:
    checked = GhostModule(4, len(permutation), 1)
    fitted = copy.deepcopy(checked)
    checked.set_channel_order(torch.tensor(permutation))
    fitted._set_fitted_order(np.array(permutation, dtype=np.int64))
    for a, b in [
        (checked.channel_order, fitted.channel_order),
        (checked._scatter_index, fitted._scatter_index),
    ]:
        assert (a is None and b is None) or torch.equal(a, b)
    x = torch.randn(1, 4, 3, 3)
    assert torch.equal(checked(x), fitted(x))


def test_fit_writes_into_a_module_of_another_dtype() -> None:
    """The kept filters are copied across dtypes (float32 conv -> float64 module) exactly."""
    conv = redundant_conv()
    ghost = GhostModule.like(conv).double()
    fit(conv, ghost)
    x = torch.randn(1, 16, 9, 9)
    kept = ghost.intrinsic_index
    assert ghost.primary_conv.weight.dtype == torch.float64
    torch.testing.assert_close(
        ghost(x.double())[:, kept], conv(x)[:, kept].double(), rtol=1e-5, atol=1e-5
    )


def test_a_channel_order_loads_into_a_module_on_the_meta_device() -> None:
    """Big models are often built on the meta device and loaded afterwards (assign=True)."""
    conv = redundant_conv()
    ghost = fit(conv, GhostModule.like(conv))
    ghost.set_channel_order(torch.arange(conv.out_channels).flip(0))
    state = ghost.state_dict()
    empty = GhostModule.like(conv).to("meta")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch: copying into meta is a no-op
        empty.load_state_dict(state)
    assert empty.channel_order.is_meta
    empty.load_state_dict(state, assign=True)
    x = torch.randn(2, conv.in_channels, 9, 9)
    with torch.no_grad():
        assert torch.equal(empty(x), ghost(x))
