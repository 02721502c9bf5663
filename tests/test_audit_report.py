"""The savings report as an auditor reads it: short, in one order, every uncounted op explained."""

from __future__ import annotations

import json
import re

import pytest
import torch
from torch import nn
from torchvision.models.resnet import BasicBlock

import ghostify
from ghostify.report import SavingsReport
from ghostify.report.operators import ADDED_BY_GHOSTS, describe

X = torch.randn(1, 3, 16, 16)


def residual_net() -> nn.Sequential:
    """A stem, a ResNet basic block and a 1x1 conv head whose output is the model's: the fitted
    head keeps its channel order (nothing after it can take another) and writes its halves with
    index_copy_."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), BasicBlock(16, 16),
        nn.Conv2d(16, 8, 1),
    )  # fmt: skip


@pytest.fixture(scope="module")
def fitted() -> SavingsReport:
    model = ghostify.convert(residual_net().eval(), example_inputs=X)
    return ghostify.report(model, X, spec="tests:residual_net")


def test_the_plan_is_attached_not_printed(fitted, tmp_path) -> None:
    text = fitted.to_markdown(tmp_path / "savings.md")
    assert "```json" not in text and len(text.splitlines()) < 80
    attached = json.loads((tmp_path / "savings.plan.json").read_text())
    assert attached == fitted.provenance["plan"]
    assert ghostify.convert(residual_net(), plan=attached) is not None  # it rebuilds the model
    assert "[`savings.plan.json`](savings.plan.json)" in text
    assert "ratio 2, dw_size 3" in text  # the settings, in one line
    assert "provenance.plan" in fitted.to_markdown()  # no file: where to find it


def test_every_op_not_counted_is_explained(fitted) -> None:
    unsupported = fitted.conventions["unsupported_ops"]
    ops = {**unsupported["before"], **unsupported["after"]}
    assert "aten::index_copy_" in unsupported["after"]  # the head's kept channel order
    assert "aten::index_copy_" not in unsupported["before"]
    text = fitted.to_markdown()
    section = text[text.index("## Not counted") : text.index("## Cross-check")]
    for op in ops:
        (row,) = [line for line in section.splitlines() if line.startswith(f"| `{op}` |")]
        what = row.split("|")[4].strip()
        assert len(what) > 30 and "no formula for (see" not in what, row
    (copies,) = [line for line in section.splitlines() if "index_copy_" in line]
    count = unsupported["after"]["aten::index_copy_"]
    assert f"The conversion added {count} run(s)." in copies
    assert "channel order" in copies


@pytest.mark.parametrize(
    ("op", "family"),
    [
        ("aten::add", "GhostModule adding"),
        ("aten::relu_", "activation"),
        ("aten::hardswish", "activation"),
        ("aten::log_softmax", "activation"),
        ("aten::expand", "data movement"),
        ("aten::_to_copy", "data movement"),
        ("aten::index_select", "data movement"),
        ("aten::max_pool2d_with_indices", "pooling"),
        ("aten::adaptive_avg_pool2d", "pooling"),
        ("aten::mul", "element-wise"),
        ("aten::rsqrt", "element-wise"),
        ("aten::layer_norm", "normalisation"),
        ("aten::weird_op", "no formula for"),
    ],
)
def test_operators_are_described_by_family(op, family) -> None:
    assert family in describe(op)


def test_the_ops_ghosts_add_are_named() -> None:
    for op in ("aten::index_copy_", "aten::cat"):
        assert "GhostModule" in ADDED_BY_GHOSTS[op]


def test_the_chart_is_titled_with_the_spec_and_shows_every_conv_in_order(fitted, tmp_path) -> None:
    pytest.importorskip("matplotlib")
    svg = fitted.to_chart(tmp_path / "c.svg").read_text()
    assert "ghostify: tests:residual_net, layers in model order" in svg
    labels = ["0 (skipped)", "3.conv1", "3.conv2", "4", "everything else"]
    where = [svg.index(f">{label}<") for label in labels]
    assert where == sorted(where)  # top to bottom in the model's order, the rest last
    assert "parameters:" in svg and "MACs:" in svg  # both panels
    assert "skipped (unchanged)" in svg


def test_one_order_everywhere(fitted) -> None:
    order = [row.name for row in fitted.in_model_order()]
    assert order == ["0", "3.conv1", "3.conv2", "4"]
    text = fitted.to_markdown()
    assert [text.index(f"| `{name}` |") for name in order] == sorted(
        text.index(f"| `{name}` |") for name in order
    )
    csv_names = [line.split(",")[0] for line in fitted.to_csv().splitlines()[1:5]]
    assert csv_names == order


def test_a_report_written_before_positions_still_reads_and_renders(fitted) -> None:
    data = fitted.to_dict()
    for row in [*data["layers"], *data["skipped"]]:
        del row["position"]
    old = SavingsReport.from_dict(data)
    assert [row.name for row in old.in_model_order()] == ["3.conv1", "3.conv2", "4", "0"]
    assert "everything else" in old.table() and "## Not counted" in old.to_markdown()
    assert re.search(r"\| 4 \| `0` \|", old.to_markdown())  # listed last, numbered in order
