"""Conv1d and Conv3d: GhostModule1d/3d shape-exact for any configuration, fitted, converted,
planned, reloaded, reported and deployed like the 2-D module."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from strategies import conv_nd_and_input  # tests/strategies.py
from torch import nn

import ghostify
from ghostify import ConfigError, GhostModule, GhostModule1d, GhostModule3d, PlanError
from ghostify.fit.kernels import fit_cheap_kernels
from ghostify.fit.kernels_nd import fit_cheap_kernels_nd


@given(st.sampled_from([1, 3]).flatmap(lambda dims: conv_nd_and_input(dims)))
def test_output_shape_matches_and_intrinsic_channels_are_exact(case) -> None:
    conv, x, ratio, dw_size = case
    ghost = GhostModule.from_conv(conv, ratio=ratio, dw_size=dw_size)
    assert type(ghost) is {1: GhostModule1d, 3: GhostModule3d}[x.dim() - 2]
    assert ghost(x).shape == conv(x).shape
    bigger = torch.randn(1, x.shape[1], *[size + 2 + i for i, size in enumerate(x.shape[2:])])
    assert ghost(bigger).shape == conv(bigger).shape
    kept = ghost.intrinsic_index
    torch.testing.assert_close(ghost(x)[:, kept], conv(x)[:, kept], rtol=1e-5, atol=1e-5)


@given(
    st.integers(1, 3).flatmap(lambda d: st.tuples(*[st.integers(1, 5)] * d)),
    st.data(),
)
def test_nd_kernel_fit_agrees_with_the_2d_fit(kernel: tuple[int, ...], data) -> None:
    """In 2-D the N-d least squares must give the 2-D code's kernels; a 1-D or 3-D problem with
    a unit-size extra axis must give the same kernels as the smaller problem."""
    dims = len(kernel)
    stride = data.draw(st.tuples(*[st.integers(1, 3)] * dims))
    dilation = data.draw(st.tuples(*[st.integers(1, 2)] * dims))
    dw_size = data.draw(st.sampled_from([1, 3, 5]))
    source, target = torch.randn(2, 4, 3, *kernel).double().unbind(0)
    kernels, residual = fit_cheap_kernels_nd(source, target, stride, dilation, dw_size)
    assert kernels.shape == (4, *[dw_size] * dims)
    if dims == 2:
        reference = fit_cheap_kernels(source, target, stride, dilation, dw_size)
        torch.testing.assert_close(kernels, reference[0])
        torch.testing.assert_close(residual, reference[1])
    if dims == 3:
        return  # torch has no 4-D convolution for the check below
    # One more axis of size 1: only the middle slice of the kernel can touch the filter.
    wider = fit_cheap_kernels_nd(
        source.unsqueeze(2), target.unsqueeze(2), (1, *stride), (1, *dilation), dw_size
    )
    torch.testing.assert_close(wider[0][:, dw_size // 2], kernels, atol=1e-9, rtol=1e-7)
    torch.testing.assert_close(wider[1], residual, atol=1e-9, rtol=1e-7)


def test_exact_scaled_copies_are_recovered_in_3d() -> None:
    conv = nn.Conv3d(6, 12, 3, padding=1, bias=True)
    with torch.no_grad():
        base = torch.randn(6, 6, 3, 3, 3)
        conv.weight.copy_(torch.cat([base, -1.5 * base]))
        conv.bias.normal_()
    ghost = GhostModule.from_conv(conv)
    x = torch.randn(1, 6, 5, 6, 7)
    torch.testing.assert_close(ghost(x), conv(x), rtol=1e-4, atol=1e-4)


def test_module_for_the_wrong_dimensions_is_refused() -> None:
    with pytest.raises(ConfigError, match="GhostModule3d stands for 3-D convolutions; got a 2-D"):
        GhostModule3d.like(nn.Conv2d(4, 8, 3))
    assert type(GhostModule1d.like(nn.Conv1d(4, 8, 3))) is GhostModule1d
    assert GhostModule3d(4, 8, 3).primary_conv.kernel_size == (3, 3, 3)


class Audio(nn.Module):
    """A small 1-D residual network, as audio and time-series models are built."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv1d(2, 16, 7, padding=3)
        self.conv1 = nn.Conv1d(16, 32, 5, padding=2, bias=False)
        self.bn1 = nn.BatchNorm1d(32)
        self.conv2 = nn.Conv1d(32, 32, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm1d(32)
        self.down = nn.Conv1d(32, 64, 3, stride=2, padding=1)
        self.head = nn.Linear(64, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)) + y)
        return self.head(torch.relu(self.down(y)).mean(dim=2))


def _trained_stats(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if isinstance(module, nn.BatchNorm1d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
    return model.eval()


def test_1d_model_converts_reloads_reports_and_deploys() -> None:
    model = _trained_stats(Audio())
    x = torch.randn(2, 2, 50)
    converted = ghostify.convert(copy.deepcopy(model), example_inputs=x)
    plan = ghostify.plan_of(converted)
    assert {row["name"] for row in plan["layers"]} == {"conv1", "conv2", "down"}
    assert plan["converted_dims"] == [1] and plan["options"]["dims"] == [1, 2, 3]
    assert all(isinstance(converted.get_submodule(n), GhostModule1d) for n in ("conv1", "down"))

    fresh = ghostify.convert(Audio(), plan=plan)
    fresh.load_state_dict(converted.state_dict())
    torch.testing.assert_close(fresh.eval()(x), converted(x))

    savings = ghostify.report(converted, x)
    assert savings.conventions["converted_dims"] == [1]
    assert {row.dims for row in savings.layers} == {1}
    # Every converted layer costs less, and the table renders 1-D kernels.
    assert all(row.macs_after < row.macs_before for row in savings.layers)
    assert "32->64 3 s2" in savings.table()

    deployed = ghostify.deploy(copy.deepcopy(converted), x)
    folds = ghostify.deploy_record(deployed).folds
    assert {fold.batchnorm for fold in folds if fold.folded} == {"bn1", "bn2"}
    torch.testing.assert_close(deployed(x), converted(x), rtol=1e-4, atol=1e-5)


def test_dims_option_selects_convolutions_by_dimension() -> None:
    model = Audio()
    ghostify.convert(model, dims=(2,))
    reasons = {row["name"]: row["reason"] for row in ghostify.plan_of(model)["skipped"]}
    assert reasons["conv1"] == "a 1-D convolution, not selected by dims=(2,)"
    assert not any(isinstance(m, GhostModule) for m in model.modules())
    with pytest.raises(ConfigError, match=r"dims must .* subset of \(1, 2, 3\).*got \(4,\)"):
        ghostify.convert(Audio(), dims=(4,))
    with pytest.raises(ConfigError, match="dims="):
        ghostify.convert(Audio(), plan=ghostify.plan_of(model), dims=(1,))


def test_plans_from_before_nd_support_leave_conv1d_alone() -> None:
    """A plan without options['dims'] was written when only Conv2d layers converted."""
    plan = {"schema": "ghostify.plan/2", "layers": [], "skipped": [], "options": {}}
    model = ghostify.convert(Audio(), plan=plan)
    assert not any(isinstance(m, GhostModule) for m in model.modules())
    with pytest.raises(PlanError, match="does not mention"):
        ghostify.convert(Audio(), plan={**plan, "options": {"dims": [1]}})


def test_video_block_converts_conv3d_with_batchnorm_folded() -> None:
    model = nn.Sequential(
        nn.Conv3d(3, 16, 3, padding=1),
        nn.Conv3d(16, 32, (1, 3, 3), padding=(0, 1, 1), bias=False),
        nn.BatchNorm3d(32),
        nn.ReLU(),
        nn.Conv3d(32, 32, (3, 1, 1), padding=(1, 0, 0), bias=False),
        nn.BatchNorm3d(32),
    ).eval()
    x = torch.randn(1, 3, 4, 10, 10)
    converted = ghostify.convert(copy.deepcopy(model), example_inputs=x)
    assert isinstance(converted[1], GhostModule3d) and isinstance(converted[4], GhostModule3d)
    assert ghostify.record_of(converted).layer("1").channel_order == "folded"
    deployed = ghostify.deploy(copy.deepcopy(converted), x)
    assert len(ghostify.deploy_record(deployed).folded) == 2
    torch.testing.assert_close(deployed(x), converted(x), rtol=1e-4, atol=1e-5)
