"""Conv subclasses converted exactly: timm's built-in types and a user-declared one.

The primary layer is the original's own kind holding its kept filters, so the intrinsic output
channels must equal the subclass's own output, for any sizes (odd input sizes exercise TF "same"
padding). A user's conv type converts like a built-in: selection, fit, plan + state_dict reload,
report, deploy (folding only where the type says it can be rescaled).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import nn

import ghostify
from ghostify import ConfigError, ConversionError, GhostModule
from ghostify.options import no_ghost_reason

timm_layers = pytest.importorskip("timm.layers")
TIMM_TYPES = ["Conv2dSame", "StdConv2d", "StdConv2dSame", "ScaledStdConv2d", "ScaledStdConv2dSame"]


@st.composite
def timm_conv_and_input(draw: st.DrawFn) -> tuple[nn.Module, torch.Tensor, int]:
    """A random timm conv subclass with random weights, gains and bias, and an input for it."""
    name = draw(st.sampled_from(TIMM_TYPES))
    groups = draw(st.sampled_from([1, 1, 2]))
    in_channels = groups * draw(st.integers(1, 4))
    out_channels = groups * draw(st.integers(2, 6))
    kernel = draw(st.integers(1, 4))  # even kernels and strides make "same" padding asymmetric
    stride = draw(st.integers(1, 3))
    dilation = draw(st.integers(1, 2))
    # Standardising a filter of one weight divides by zero variance: timm itself refuses it.
    assume(in_channels // groups * kernel * kernel > 1)
    layer = getattr(timm_layers, name)(
        in_channels,
        out_channels,
        kernel,
        stride=stride,
        dilation=dilation,
        groups=groups,
        bias=draw(st.booleans()),
    )
    with torch.no_grad():
        layer.weight.normal_()
        if layer.bias is not None:
            layer.bias.normal_()
        if hasattr(layer, "gain"):
            layer.gain.normal_()  # a per-channel parameter the primary must slice too
    reach = (kernel - 1) * dilation + 1
    size = (draw(st.integers(reach, reach + 8)), draw(st.integers(reach, reach + 8)))
    ratio = draw(st.integers(2, 4))
    assume(no_ghost_reason(out_channels, ratio, groups) is None)  # convert skips such a layer
    return layer, torch.randn(draw(st.integers(1, 2)), in_channels, *size), ratio


@given(timm_conv_and_input())
def test_timm_subclass_intrinsic_channels_are_exact(case) -> None:
    layer, x, ratio = case
    ghost = GhostModule.from_conv(layer, ratio=ratio)
    assert type(ghost.primary_conv) is type(layer)
    with torch.no_grad():
        want, got = layer(x), ghost(x)
    assert got.shape == want.shape
    kept = ghost.intrinsic_index
    torch.testing.assert_close(got[:, kept], want[:, kept], rtol=1e-5, atol=1e-5)
    # Another input size: "same" padding is recomputed per input.
    other = torch.randn(1, x.shape[1], x.shape[2] + 1, x.shape[3] + 2)
    torch.testing.assert_close(ghost(other)[:, kept], layer(other)[:, kept], rtol=1e-5, atol=1e-5)


def test_fitting_into_a_primary_of_another_kind_is_refused() -> None:
    layer = timm_layers.ScaledStdConv2d(4, 8, 3)
    with pytest.raises(ConfigError, match="needs a ScaledStdConv2d: build the module with"):
        ghostify.fit(layer, GhostModule(4, 8, 3))


def test_ghosts_are_fitted_on_the_standardised_filters() -> None:
    """Ghost filters that are scaled copies of kept ones *after* standardisation are exact."""
    layer = timm_layers.StdConv2d(8, 16, 3, bias=False)
    with torch.no_grad():
        base = torch.randn(8, 8, 3, 3)
        # Standardisation removes offset and scale: these raw filters all standardise to +-base's.
        layer.weight.copy_(torch.cat([base, 3.0 - 0.5 * base]))
    ghost = GhostModule.from_conv(layer)
    x = torch.randn(2, 8, 11, 11)
    torch.testing.assert_close(ghost(x), layer(x), rtol=1e-4, atol=1e-4)


class WSConv2d(nn.Conv2d):
    """A user's weight-standardised conv with a per-filter gain (written for this test)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.ones(self.out_channels))

    def standardised(self) -> torch.Tensor:
        flat = self.weight.flatten(1)
        flat = (flat - flat.mean(1, keepdim=True)) / (flat.std(1, keepdim=True) + 1e-5)
        return (flat * self.gain[:, None]).view_as(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.standardised()
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


def _scale_gain(layer: WSConv2d, scale: torch.Tensor) -> None:
    layer.gain.mul_(scale)
    if layer.bias is not None:
        layer.bias.mul_(scale)


@pytest.fixture
def ws_registered():
    ghostify.register_conv_type(
        WSConv2d,
        primary=lambda conv, keep: ghostify.slice_output_channels(conv, keep, ("weight", "gain")),
        effective_weight=WSConv2d.standardised,
        permute_inputs=True,
    )
    yield
    ghostify.unregister_conv_type(WSConv2d)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.a = WSConv2d(16, 32, 3, padding=1, bias=False)
        self.bn_a = nn.BatchNorm2d(32)
        self.b = WSConv2d(32, 32, 3, padding=1, bias=False)
        self.bn_b = nn.BatchNorm2d(32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.relu(self.bn_a(self.a(x)))
        return self.bn_b(self.b(x))


def _net() -> Net:
    net = Net()
    with torch.no_grad():
        for module in (net.a, net.b):
            module.gain.uniform_(0.5, 2.0)
        for bn in (net.bn_a, net.bn_b):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
    return net.eval()


def test_unregistered_subclass_is_skipped_with_what_to_do() -> None:
    model = ghostify.convert(_net())
    reasons = {row["name"]: row["reason"] for row in ghostify.plan_of(model)["skipped"]}
    assert "ghostify.register_conv_type(WSConv2d, ...)" in reasons["a"]
    assert type(model.a) is WSConv2d


def test_user_conv_type_converts_exactly_and_reloads_from_a_plan(ws_registered) -> None:
    model = _net()
    x = torch.randn(2, 3, 12, 12)
    converted = ghostify.convert(copy.deepcopy(model), example_inputs=x)
    plan = ghostify.plan_of(converted)
    rows = {row["name"]: row for row in plan["layers"]}
    assert set(rows) == {"a", "b"}
    assert rows["a"]["type"] == f"{__name__}.WSConv2d"
    ghost = converted.a
    assert type(ghost.primary_conv) is WSConv2d and ghost.primary_conv.gain.shape == (16,)
    # Layer a's outputs were reordered into b's input channels (exact for a standardised conv).
    assert rows["a"]["channel_order"] == "folded"
    channel_at = torch.tensor(ghostify.record_of(converted).layer("a").output_order)
    feature = torch.relu(model.stem(x))
    torch.testing.assert_close(ghost(feature)[:, :16], model.a(feature)[:, channel_at[:16]])

    fresh = ghostify.convert(Net(), plan=plan)
    assert type(fresh.a.primary_conv) is WSConv2d
    fresh.load_state_dict(converted.state_dict())
    torch.testing.assert_close(fresh.eval()(x), converted(x))
    with pytest.raises(ghostify.PlanError, match="was a .*WSConv2d; this model's layer is a"):
        other = Net()
        other.a = nn.Conv2d(16, 32, 3, padding=1, bias=False)
        ghostify.convert(other, plan=plan)

    savings = ghostify.report(fresh, x)  # no kept originals: the WSConv2d stand-in is counted
    assert {row.primary_type for row in savings.layers} == {"WSConv2d"}
    assert savings.totals["macs_before"] == ghostify.report(converted, x).totals["macs_before"]
    assert savings.totals["macs_after"] < savings.totals["macs_before"]


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


def test_batchnorm_folds_only_into_primaries_that_can_be_rescaled(ws_registered) -> None:
    x = torch.randn(1, 3, 10, 10)
    converted = ghostify.convert(_net(), example_inputs=x)
    deployed = ghostify.deploy(copy.deepcopy(converted), x, memory_format="contiguous")
    kept = {fold.batchnorm: fold.reason for fold in ghostify.deploy_record(deployed).folds}
    assert "cannot be rescaled exactly" in kept["bn_a"] and "WSConv2d" in kept["bn_a"]
    assert relative_error(deployed(x), converted(x)) < 1e-5

    ghostify.register_conv_type(
        WSConv2d,
        primary=lambda conv, keep: ghostify.slice_output_channels(conv, keep, ("weight", "gain")),
        effective_weight=WSConv2d.standardised,
        scale_channels=_scale_gain,  # the output scales with the gain: folding is exact
    )
    deployed = ghostify.deploy(copy.deepcopy(converted), x, memory_format="contiguous")
    assert {f.batchnorm for f in ghostify.deploy_record(deployed).folded} == {"bn_a", "bn_b"}
    assert relative_error(deployed(x), converted(x)) < 1e-5


def test_a_wrong_primary_is_caught_and_the_model_left_unchanged() -> None:
    ghostify.register_conv_type(
        WSConv2d, primary=lambda conv, keep: conv, effective_weight=WSConv2d.standardised
    )
    try:
        model = _net()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(ConversionError, match=r"out_channels=16 .*returned 32"):
            ghostify.convert(model)
        assert type(model.a) is WSConv2d
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    finally:
        ghostify.unregister_conv_type(WSConv2d)


@pytest.mark.parametrize(
    ("cls", "kwargs", "message"),
    [
        (nn.Linear, {}, "needs a subclass of nn.Conv1d, nn.Conv2d or nn.Conv3d; got"),
        (nn.Conv2d, {}, "Conv2d is built in"),
        (WSConv2d, {"primary": "slice"}, "primary must be a callable; got 'slice'"),
    ],
)
def test_bad_registrations_are_named(cls: type, kwargs: dict, message: str) -> None:
    arguments = {"primary": lambda c, k: c, "effective_weight": lambda c: c.weight, **kwargs}
    with pytest.raises(ConfigError, match=message):
        ghostify.register_conv_type(cls, **arguments)


class ConfigOnly(nn.Conv3d):
    """Like torchvision's Conv3DSimple: a subclass that only fixes constructor arguments."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels, 2 * channels, (1, 3, 3), padding=(0, 1, 1), bias=False)


class Shifted(nn.Conv3d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + 1.0


def test_subclass_inheriting_the_convolution_converts_and_one_overriding_it_does_not() -> None:
    model = nn.Sequential(nn.Conv3d(3, 8, 1), ConfigOnly(8), Shifted(16, 16, 1))
    ghostify.convert(model)
    plan = ghostify.plan_of(model)
    assert [row["type"].rsplit(".", 1)[-1] for row in plan["layers"]] == ["ConfigOnly"]
    reasons = {row["name"]: row["reason"] for row in plan["skipped"]}
    assert "Shifted subclasses nn.Conv3d" in reasons["2"]


def test_a_transposed_conv_after_a_converted_conv_is_no_conv_type() -> None:
    # ultralytics' segmentation head: the channel-order fold walks into a ConvTranspose2d
    assert ghostify.layers.conv_types.conv_type_of(nn.ConvTranspose2d(3, 3, 2)) is None
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.ConvTranspose2d(32, 8, 2, stride=2),
    ).eval()
    x = torch.randn(2, 3, 8, 8)
    ghostify.convert(model)
    assert [row["name"] for row in ghostify.plan_of(model)["layers"]] == ["2"]
    assert model(x).shape == (2, 8, 16, 16)
