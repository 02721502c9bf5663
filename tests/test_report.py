"""The savings report: figures against independent counts, invariants, rendering, round trips."""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import warnings

import pytest
import torch
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import ghostify
from ghostify.errors import ConfigError
from ghostify.layers.ghost_module import GhostModule
from ghostify.report import SavingsReport, human, rebuild_original, report
from ghostify.report.counting import FLOP_COUNTER, FVCORE

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    from fvcore.nn import parameter_count


def conv_macs(n: int, cin: int, cout: int, groups: int, k: int, h: int, w: int) -> int:
    """Hand formula for one convolution: out * in/groups * kh * kw * H_out * W_out, per sample."""
    return n * cout * (cin // groups) * k * k * h * w


class Tiny(nn.Module):
    """Conv stem, a biased conv, a grouped strided conv called once, a conv shared by two names
    and called twice, BatchNorm and a linear head: the cases the report has to get right."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1, bias=True), nn.BatchNorm2d(32))
        self.down = nn.Conv2d(32, 64, 3, stride=2, padding=1, groups=2, bias=False)
        self.shared = nn.Conv2d(64, 64, 1, bias=False)
        self.alias = self.shared
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.body(self.stem(x)))
        x = self.alias(self.shared(self.down(x)))
        return self.head(x.mean((2, 3)))


X = torch.randn(2, 3, 12, 12)


@pytest.fixture(scope="module")
def tiny() -> tuple[nn.Module, nn.Module, SavingsReport]:
    torch.manual_seed(0)
    original = Tiny()
    converted = ghostify.convert(copy.deepcopy(original), init="scratch")
    return original, converted, report(converted, X)


@pytest.fixture(scope="module")
def resnet() -> tuple[nn.Module, nn.Module, SavingsReport, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(1, 3, 32, 32)
    original = torchvision.models.resnet18(weights=None)
    converted = ghostify.convert(copy.deepcopy(original), init="scratch", example_inputs=x)
    return original, converted, report(converted, x), x


def test_totals_equal_independent_fvcore_counts(resnet, fvcore_macs) -> None:
    original, converted, rep, x = resnet
    totals = rep.totals
    assert totals["macs_before"] == fvcore_macs(original, x)
    assert totals["macs_after"] == fvcore_macs(converted, x)
    assert totals["params_before"] == parameter_count(original)[""]
    assert totals["params_after"] == parameter_count(converted)[""]
    assert totals["macs_saved"] == totals["macs_before"] - totals["macs_after"]
    assert totals["macs_ratio"] == pytest.approx(totals["macs_before"] / totals["macs_after"], 1e-4)
    expected_percent = 100 * (1 - totals["params_after"] / totals["params_before"])
    assert totals["params_reduction_percent"] == pytest.approx(expected_percent, abs=0.01)


def test_layer_rows_match_hand_formulas(tiny) -> None:
    _, converted, rep = tiny
    rows = {row.name: row for row in rep.layers}
    assert set(rows) == {"body.0", "down", "shared"}  # the stem is skipped by default
    # body.0: 16 -> 32, 3x3, 12x12 output, batch 2.
    body = rows["body.0"]
    assert body.macs_before == conv_macs(2, 16, 32, 1, 3, 12, 12)
    assert body.params_before == 32 * 16 * 9 + 32
    intrinsic, ghosts = 16, 16
    primary = conv_macs(2, 16, intrinsic, 1, 3, 12, 12)
    assert body.macs_after == primary + 2 * ghosts * 9 * 12 * 12  # depthwise 3x3 per ghost
    assert body.params_after == intrinsic * 16 * 9 + intrinsic + ghosts * 9 + ghosts
    # down: grouped and strided, 6x6 output.
    down = rows["down"]
    assert (down.groups, down.stride, down.output_shape) == (2, [2, 2], [2, 64, 6, 6])
    assert down.macs_before == conv_macs(2, 32, 64, 2, 3, 6, 6)
    # shared: one module under two names, called twice: both calls counted, once per row.
    shared = rows["shared"]
    assert (shared.calls, shared.aliases) == (2, ["alias"])
    assert shared.macs_before == 2 * conv_macs(2, 64, 64, 1, 1, 6, 6)
    assert isinstance(converted.alias, GhostModule)


def test_layer_rows_add_up_to_the_total_saving(resnet) -> None:
    _, _, rep, _ = resnet
    assert sum(row.macs_saved for row in rep.layers) == rep.totals["macs_saved"]
    assert sum(row.params_saved for row in rep.layers) == rep.totals["params_saved"]
    assert rep.cross_check["layer_rows_add_up"] is True


def test_every_conv_is_either_converted_or_skipped_with_a_reason(resnet) -> None:
    original, _, rep, _ = resnet
    convs = {name for name, m in original.named_modules() if isinstance(m, nn.Conv2d)}
    converted = {row.name for row in rep.layers}
    skipped = {row.name: row for row in rep.skipped}
    assert converted | set(skipped) == convs and not converted & set(skipped)
    assert "stem" in skipped["conv1"].reason
    stem_macs = conv_macs(1, 3, 64, 1, 7, 16, 16)
    assert (skipped["conv1"].macs, skipped["conv1"].params) == (stem_macs, 64 * 3 * 49)


def test_cross_check_with_flop_counter_mode(resnet) -> None:
    original, _, rep, x = resnet
    check = rep.cross_check
    assert check["agree"] is True
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        copy.deepcopy(original).eval()(x)
    # conv + linear are all FlopCounterMode counts in a ResNet: 2 FLOPs per MAC.
    before = check["before"]
    assert before["conv"]["fvcore"] + before["linear"]["fvcore"] == counter.get_total_flops() // 2


def test_conventions_and_provenance(resnet) -> None:
    _, converted, rep, _ = resnet
    conventions = rep.conventions
    assert conventions["unit"] == "MACs" and conventions["counter"] == FVCORE
    assert conventions["batchnorm_included"] is True
    assert conventions["inputs"] == [{"shape": [1, 3, 32, 32], "dtype": "float32"}]
    # Unfitted (scratch) modules have the identity channel order: no gather runs at all.
    assert "aten::index_select" not in conventions["unsupported_ops"]["after"]
    assert "aten::add_" in conventions["unsupported_ops"]["before"]
    provenance = rep.provenance
    assert provenance["model_class"] == "torchvision.models.resnet.ResNet"
    assert provenance["torch"] == torch.__version__ and provenance["fvcore"]
    assert provenance["plan"] == json.loads(json.dumps(ghostify.plan_of(converted)))
    assert "created" not in provenance
    assert rep.schema == rep.to_dict()["schema"] == "ghostify.report/1"


def test_batchnorm_can_be_left_out(tiny, fvcore_macs) -> None:
    original, converted, _ = tiny
    rep = report(converted, X, include_batchnorm=False)
    assert rep.totals["macs_before"] == fvcore_macs(original, X, batchnorm=False)
    assert rep.totals["macs_after"] == fvcore_macs(converted, X, batchnorm=False)
    assert rep.conventions["batchnorm_included"] is False


def test_without_batchnorm_the_totals_are_the_convolutions_alone() -> None:
    """Conv 3->8 and 8->16, 3x3, on 16x16: the MACs are out * in * 9 * output positions."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 16, 3))
    model.append(nn.BatchNorm2d(16))
    converted = ghostify.convert(model.eval(), init="scratch")
    x = torch.randn(1, 3, 16, 16)
    convs = 8 * 3 * 9 * 14 * 14 + 16 * 8 * 9 * 12 * 12
    with_bn = report(converted, x).totals["macs_before"]
    assert report(converted, x, include_batchnorm=False).totals["macs_before"] == convs < with_bn


def test_json_round_trip_and_byte_for_byte_reproducibility(tiny, tmp_path) -> None:
    _, converted, rep = tiny
    text = rep.to_json(tmp_path / "r.json")
    assert (tmp_path / "r.json").read_text() == text
    again = SavingsReport.from_json(tmp_path / "r.json")
    assert again == rep and SavingsReport.from_json(text).to_json() == text
    assert json.loads(text) == rep.to_dict()
    assert report(converted, X).to_json() == text  # same model and inputs, same bytes
    stamped = report(converted, X, timestamp=True).to_dict()
    del stamped["provenance"]["created"]
    assert stamped == rep.to_dict()
    with pytest.raises(ConfigError, match="not a ghostify report"):
        SavingsReport.from_dict({"schema": "other"})


def test_the_users_model_is_left_exactly_as_it_was() -> None:
    model = ghostify.convert(Tiny(), init="scratch").train()
    model.down.eval()  # a mixed training state must survive too
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {name: m.training for name, m in model.named_modules()}
    rng = torch.get_rng_state()
    report(model, X)
    assert flags == {name: m.training for name, m in model.named_modules()}
    after = model.state_dict()
    assert state.keys() == after.keys()
    assert all(torch.equal(state[k], after[k]) for k in state)  # BN running stats included
    assert torch.equal(rng, torch.get_rng_state())


def test_rebuild_original_replaces_every_registration() -> None:
    original = Tiny()
    converted = ghostify.convert(copy.deepcopy(original), init="scratch")
    rebuilt = rebuild_original(converted)
    assert rebuilt.shared is rebuilt.alias and type(rebuilt.shared) is nn.Conv2d
    assert not any(isinstance(m, GhostModule) for m in rebuilt.modules())
    assert any(isinstance(m, GhostModule) for m in converted.modules())  # the input is untouched
    for name in ("stem", "body.0", "down", "shared"):
        a, b = original.get_submodule(name), rebuilt.get_submodule(name)
        assert a.weight.shape == b.weight.shape and (a.bias is None) == (b.bias is None)
        assert (a.stride, a.padding, a.groups) == (b.stride, b.padding, b.groups)


class WithScripted(nn.Module):
    """fvcore cannot trace a model holding a TorchScript submodule."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 32, 3, padding=1)
        self.mid = nn.Conv2d(32, 32, 3, padding=1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            self.scripted = torch.jit.script(nn.Sequential(nn.Conv2d(32, 8, 1), nn.ReLU()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scripted(self.mid(self.conv(x)))


def test_falls_back_to_flop_counter_mode_when_fvcore_cannot_trace() -> None:
    x = torch.randn(1, 3, 8, 8)
    original = WithScripted()
    converted = ghostify.convert(copy.deepcopy(original), init="scratch")
    rep = report(converted, x)
    assert rep.conventions["counter"] == FLOP_COUNTER
    assert "fvcore could not trace" in rep.conventions["fallback_reason"]
    assert rep.conventions["batchnorm_included"] is False and rep.cross_check["agree"] is None
    expected = sum(
        conv_macs(1, cin, cout, 1, k, 8, 8)
        for cin, cout, k in ((3, 32, 3), (32, 32, 3), (32, 8, 1))
    )
    assert rep.totals["macs_before"] == expected
    assert [row.name for row in rep.layers] == ["mid"]
    assert rep.layers[0].macs_after == conv_macs(1, 32, 16, 1, 3, 8, 8) + 16 * 9 * 64
    assert "fvcore could not trace" in str(rep)


def test_inputs_the_model_rejects_give_a_clear_error(tiny) -> None:
    _, converted, _ = tiny
    with pytest.raises(ConfigError, match=r"rejected example_inputs \(2x5x12x12\)"):
        report(converted, torch.randn(2, 5, 12, 12))
    with pytest.raises(ConfigError, match="must be a torch.nn.Module"):
        report("model", X)


def test_an_unconverted_model_reports_every_conv_as_skipped() -> None:
    rep = report(Tiny(), X)
    assert rep.layers == [] and len(rep.skipped) == 4
    assert rep.totals["macs_saved"] == 0 and rep.totals["macs_ratio"] == 1.0


def test_table_lists_every_conv_in_model_order_and_adds_up(resnet) -> None:
    original, _, rep, _ = resnet
    lines = str(rep).splitlines()
    rule = lines.index("-" * len(lines[1]))
    other = next(i for i, line in enumerate(lines) if line.startswith("everything else"))
    total = next(i for i, line in enumerate(lines) if line.startswith("total (whole model)"))
    names = [line.split()[0] for line in lines[rule + 1 : other]]
    convs = [name for name, m in original.named_modules() if isinstance(m, nn.Conv2d)]
    assert names == convs  # the model's order, the skipped stem in its place
    assert lines[rule + 1].split()[:4] == ["conv1", "3->64", "7x7", "s2"]
    assert " skip " in lines[rule + 1]
    assert human(rep.everything_else()["params_before"]) in lines[other]
    assert human(rep.totals["macs_before"]) in lines[total]
    assert human(rep.totals["params_after"]) in lines[total]
    few = rep.table(max_rows=3).splitlines()
    shown = [line.split()[0] for line in few[rule + 1 : rule + 4]]
    saved = {row.name: row.macs_saved for row in rep.layers}
    assert set(shown) == set(sorted(saved, key=saved.get, reverse=True)[:3])
    assert shown == [name for name in convs if name in shown]  # still in the model's order


def test_everything_else_is_the_model_outside_its_convolutions(tiny) -> None:
    """Tiny's non-conv work: BatchNorm(32) on 2x32x12x12 (eval, affine: 2 MACs per element)
    and Linear(64, 10) on a batch of 2; its parameters: BatchNorm's 64 and the linear 650."""
    _, _, rep = tiny
    rest = rep.everything_else()
    assert rest["macs_before"] == rest["macs_after"] == 2 * (2 * 32 * 12 * 12) + 2 * 64 * 10
    assert rest["params_before"] == rest["params_after"] == 2 * 32 + 64 * 10 + 10


@pytest.mark.parametrize(
    ("count", "text"),
    [
        (4_111_514_624, "4.11 G"),
        (25_557_032, "25.6 M"),
        (999_700, "1.00 M"),
        (131_072, "131 K"),
        (512, "512"),
        (0, "0"),
        (-2_048_000, "-2.05 M"),
    ],
)
def test_human_units(count: int, text: str) -> None:
    assert human(count) == text


def test_markdown_and_csv_exports(tiny, tmp_path) -> None:
    _, _, rep = tiny
    markdown = rep.to_markdown(tmp_path / "r.md")
    assert (tmp_path / "r.md").read_text() == markdown
    for row in rep.layers:
        assert f"| `{row.name}` | {row.in_channels} | {row.out_channels} |" in markdown
    assert f"{rep.totals['macs_before']:,}" in markdown
    assert "## Convolutions (3 converted, 1 skipped), in model order" in markdown
    rows = list(csv.DictReader(io.StringIO(rep.to_csv(tmp_path / "r.csv"))))
    assert [r["name"] for r in rows] == ["stem", "body.0", "down", "shared", "(everything else)",
                                         "(whole model)"]  # fmt: skip
    assert [r["status"] for r in rows] == ["skipped"] + ["converted"] * 3 + ["other", "total"]
    for column in ("macs_before", "macs_after", "params_before", "params_after"):
        assert sum(int(r[column]) for r in rows[:-1]) == int(rows[-1][column])  # parts add up
    by_name = {r["name"]: r for r in rows}
    assert int(by_name["down"]["macs_before"]) == conv_macs(2, 32, 64, 2, 3, 6, 6)
    assert by_name["stem"]["reason"].startswith("network stem")


def test_chart_png_and_svg(tiny, tmp_path) -> None:
    pytest.importorskip("matplotlib")
    _, _, rep = tiny
    assert rep.to_chart(tmp_path / "c.png").read_bytes().startswith(b"\x89PNG")
    assert b"<svg" in rep.to_chart(tmp_path / "c.svg").read_bytes()
    with pytest.raises(ConfigError, match=r"\.png, \.svg or \.pdf"):
        rep.to_chart(tmp_path / "c.txt")


def test_reduction_fields_are_finite_numbers(resnet) -> None:
    _, _, rep, _ = resnet
    for key in ("macs_ratio", "macs_reduction_percent", "params_ratio", "params_reduction_percent"):
        assert math.isfinite(rep.totals[key]) and rep.totals[key] > 0


class _TakesToken(nn.Module):
    def forward(self, x: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3)) + token.sum()


class _HandsParameterToSubmodule(nn.Module):
    """Like timm's CaiT: a parameter view is passed to a submodule as an argument."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3)
        self.body = nn.Conv2d(16, 32, 3)
        self.token = nn.Parameter(torch.zeros(1, 1))
        self.head = _TakesToken()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.stem(x)), self.token.expand(x.shape[0], -1))


def test_report_handles_a_parameter_view_passed_to_a_submodule() -> None:
    model = ghostify.convert(_HandsParameterToSubmodule())
    x = torch.randn(2, 3, 12, 12)
    totals = ghostify.report(model, x).to_dict()["totals"]
    # body: 16 -> 32 channels, 3x3, on a 8x8 output; stem 3 -> 16 on 10x10 (kept)
    stem = 16 * 3 * 9 * 10 * 10 * 2
    assert totals["macs_before"] == stem + 32 * 16 * 9 * 8 * 8 * 2
    assert totals["macs_after"] == stem + (16 * 16 * 9 + 16 * 9) * 8 * 8 * 2


class _CachesActivations(nn.Module):
    """Like torchvision's RAFT: keeps tensors of its last forward in a plain attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3)
        self.body = nn.Conv2d(16, 32, 3)
        self.cache: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(self.stem(x))
        self.cache = [out * 2]
        return out


def test_report_after_a_training_step_that_cached_autograd_tensors() -> None:
    model = ghostify.convert(_CachesActivations())
    x = torch.randn(1, 3, 10, 10)
    model(x).sum().backward()  # leaves a non-leaf tensor in model.cache
    assert not model.cache[0].is_leaf
    rep = ghostify.report(model, x)
    assert rep.to_dict()["totals"]["macs_after"] < rep.to_dict()["totals"]["macs_before"]
    assert not model.cache[0].is_leaf  # the user's model is untouched


def test_convolutions_with_string_padding_are_counted() -> None:
    """padding="same" traces as aten::_convolution_mode, which fvcore alone does not count."""
    from ghostify.report.counting import fvcore_count

    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding="same"), nn.Conv2d(16, 4, 1, padding="valid"))
    count = fvcore_count(model, (torch.randn(2, 8, 10, 10),))
    assert count.conv == 2 * 100 * (16 * 8 * 9 + 4 * 16)  # batch x pixels x MACs per pixel


class _PerBoxHead(nn.Module):
    """A detector in miniature: the features' values decide how many 'boxes' the head runs on,
    as score thresholds and NMS decide it for torchvision's keypoint and mask heads."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.features = nn.Conv2d(16, 32, 3, padding=1)
        self.head = nn.Conv2d(32, 64, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.features(torch.relu(self.stem(x)))
        boxes = int((features.mean(1) >= 0).sum().clamp(1, 16))  # positions that "score"
        return self.head(features[:1].repeat(boxes, 1, 1, 1))


def test_a_converted_model_doing_other_work_is_flagged() -> None:
    """keypointrcnn's converted model ran its keypoint head on 200 boxes, the original on 13: the
    report counted 65.2G -> 371.6G MACs and said nothing about comparing different work."""
    torch.manual_seed(0)
    model = _PerBoxHead()
    with torch.no_grad():  # the original scores nothing: its head runs on one box
        model.features.weight.zero_()
        model.features.bias.fill_(-1.0)
    converted = ghostify.convert(model)
    with torch.no_grad():  # the converted one scores every position: 16 boxes
        for param in converted.features.parameters():
            param.zero_()
    x = torch.randn(1, 3, 8, 8)
    rep = report(converted, x)
    head = next(row for row in rep.layers if row.name == "head")
    assert head.macs_before == conv_macs(1, 32, 64, 1, 3, 8, 8)  # counted right for one box
    assert rep.totals["macs_after"] > rep.totals["macs_before"]  # but the totals compare 1 to 16
    assert rep.cross_check["same_workload"] is False
    assert rep.cross_check["workload_differs"] == ["head"]
    assert "different workloads" in rep.to_markdown()
    assert SavingsReport.from_json(rep.to_json()).cross_check == rep.cross_check


def test_a_model_doing_the_same_work_is_not_flagged(tiny) -> None:
    _, _, rep = tiny
    assert rep.cross_check["same_workload"] is True
    assert rep.cross_check["workload_differs"] == []
