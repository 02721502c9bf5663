"""ghostify.deploy and the runtimes: BatchNorm folding is exact, exports run and agree."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from hypothesis import given
from hypothesis import strategies as st
from strategies import conv_and_input
from torch import nn

import ghostify
from ghostify import ConfigError, GhostModule
from ghostify.deploy import check_onnx


def randomise_batchnorms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running statistics and affine parameters, so folding has work to do."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(torch.rand(n, generator=generator) * 2 - 1)
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.copy_(torch.rand(n, generator=generator) - 0.5)
    return model


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))


@given(conv_and_input(), st.booleans(), st.booleans())
def test_folding_a_batchnorm_after_any_ghost_module_is_exact(case, fitted: bool, keep_order):
    """Padding modes, strides, dilation, groups, biases: the folded module computes the same.

    The cheap op's zero padding is where a naive fold (bias inside the primary conv) goes wrong:
    borders would see the BatchNorm shift instead of zeros.
    """
    conv, x, ratio, dw_size = case
    ghost = GhostModule.from_conv(conv, ratio, dw_size, init="weights" if fitted else "scratch")
    if not keep_order:
        ghost.set_channel_order(None)
    with torch.no_grad():  # a scratch module's cheap kernels are small: make the ghosts matter
        ghost.cheap_conv.weight.mul_(3)
    model = randomise_batchnorms(nn.Sequential(ghost, nn.BatchNorm2d(conv.out_channels))).eval()
    with torch.no_grad():
        want = model(x)
        ghostify.deploy(model, x, memory_format="contiguous")
        got = model(x)
    assert isinstance(model[1], nn.Identity)
    assert relative_error(got, want) < 1e-5


@given(conv_and_input(), st.booleans())
def test_folding_two_batchnorms_in_turn_is_exact_and_costs_no_pass_with_a_1x1_cheap_op(
    case, keep_order
) -> None:
    """A second fold composes with the first (biases already folded); with a 1x1 cheap op the
    intrinsic shifts move into the primary conv, so no separate bias pass is left."""
    conv, x, ratio, dw_size = case
    ghost = GhostModule.from_conv(conv, ratio, dw_size)
    if not keep_order:
        ghost.set_channel_order(None)
    channels = conv.out_channels
    bns = [randomise_batchnorms(nn.Sequential(nn.BatchNorm2d(channels)), seed=s)[0] for s in (1, 2)]
    model = nn.Sequential(ghost, *bns).eval()
    with torch.no_grad():
        want = model(x)
        ghost.fold_batchnorm(bns[0])
        ghost.fold_batchnorm(bns[1])
        got = ghost(x)
    assert relative_error(got, want) < 1e-5
    assert (ghost.intrinsic_bias is None) == (dw_size == 1)


@pytest.fixture(scope="module")
def converted_resnet() -> nn.Module:
    """resnet18 with non-trivial BatchNorms, converted (fitted, so channel orders are folded)."""
    torch.manual_seed(0)
    return ghostify.convert(randomise_batchnorms(torchvision.models.resnet18()))


def test_deploy_refuses_training_mode_and_leaves_the_model_alone(converted_resnet) -> None:
    model = copy.deepcopy(converted_resnet)
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ConfigError, match="eval mode.*model.eval"):
        ghostify.deploy(model)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 20


def test_deployed_resnet_has_no_batchnorm_left_and_the_same_outputs(converted_resnet) -> None:
    model = copy.deepcopy(converted_resnet).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = model(x)
        ghostify.deploy(model, x)
        got = model(x)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    record = ghostify.deploy_record(model)
    # 20 BatchNorms: 19 after converted or plain convs, one after the (kept) stem.
    assert len(record.folded) == 20 and record.memory_format in ("contiguous", "channels_last")
    assert relative_error(got, want) < 1e-4


def test_deploy_rejects_bad_memory_format(converted_resnet) -> None:
    model = copy.deepcopy(converted_resnet).eval()
    with pytest.raises(ConfigError, match="memory_format must be one of"):
        ghostify.deploy(model, memory_format="nhwc")


def test_onnx_export_runs_in_onnxruntime_with_a_dynamic_batch(converted_resnet, tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    model = copy.deepcopy(converted_resnet).eval()
    x = torch.randn(2, 3, 64, 64)
    ghostify.deploy(model, x, memory_format="contiguous")
    # Every residual stream runs in one order: no gather is left. One is put back here (a
    # writer gathering into its group's order), to see how it exports.
    assert not any(
        m.channel_order is not None for m in model.modules() if isinstance(m, GhostModule)
    )
    model.layer4[1].conv2.set_channel_order(torch.arange(512).flip(0))
    path = ghostify.export_onnx(model, x, tmp_path / "ghost.onnx")  # checks batch 2 in ORT
    # Another batch size than the one exported with: the batch dimension is dynamic.
    check_onnx(path, model, (torch.randn(3, 3, 64, 64),))
    import onnx

    graph = onnx.load(str(path)).graph
    ops = [node.op_type for node in graph.node]
    assert "BatchNormalization" not in ops and ops.count("Concat") >= 8
    # A gathered order is one Gather after the Concat, not a scatter between transposes,
    # which takes ONNX Runtime off its blocked-layout fast path.
    assert ops.count("Gather") == 1
    assert "ScatterND" not in ops and "ScatterElements" not in ops and "Transpose" not in ops


class Small(nn.Module):
    """A small residual CNN, quick to compile and export."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.conv1 = nn.Conv2d(16, 32, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 16, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return self.head((x + y).mean(dim=(2, 3)))


def test_torch_export_and_compile_run_converted_models() -> None:
    torch.manual_seed(0)
    model = randomise_batchnorms(ghostify.convert(Small())).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        want = model(x)
        exported = torch.export.export(model, (x,)).module()
        assert relative_error(exported(x), want) < 1e-5
        compiled = torch.compile(model, backend="aot_eager")
        assert relative_error(compiled(x), want) < 1e-5
