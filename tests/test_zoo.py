"""Model-zoo coverage: a fast representative subset by default, the full sweep with ``-m zoo``.

The subset covers one model per kind of output or failure mode the sweep has met: plain tensors,
dict outputs (segmentation), lists of dicts with a train-mode loss (detection), two inputs and a
list of outputs (optical flow), Conv3d only (video), fixed image sizes (ViT-likes),
``Conv2d`` subclasses (timm's ScaledStdConv2d, converted exactly), convs reached only in
training mode, Hugging Face ``transformers`` models built from configs (``ModelOutput`` dicts,
no fx trace) and ultralytics YOLO models built from YAML (tuple outputs, a train-mode head).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import ghostify
from ghostify.testing import coverage
from ghostify.testing.runner import Runner
from ghostify.testing.zoo_cases import Case
from ghostify.testing.zoo_checks import (
    DETECTIONS,
    PASSING,
    check_conversion,
    check_macs,
    conv_names,
    run_job,
    unaccounted_convs,
)
from ghostify.testing.zoo_jobs import (
    TRANSFORMERS_MODELS,
    ULTRALYTICS_MODELS,
    Job,
    job_for,
    timm_jobs,
    torchvision_jobs,
    transformers_jobs,
    ultralytics_jobs,
)
from ghostify.testing.zoo_outputs import count_nonfinite, diff, signature

# torchvision's googlenet/inception warn about a future change of their default initialisation
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

FAST = [
    # (zoo, model, family, expected status)
    ("torchvision", "resnet18", "classification", "ok"),
    ("torchvision", "mobilenet_v3_small", "classification", "ok"),
    ("torchvision", "googlenet", "classification", "ok"),
    ("torchvision", "lraspp_mobilenet_v3_large", "segmentation", "ok"),
    ("torchvision", "ssdlite320_mobilenet_v3_large", "detection", "ok"),
    ("torchvision", "raft_small", "flow", "ok"),
    ("torchvision", "r3d_18", "video", "ok"),  # Conv3d: converted as GhostModule3d
    ("timm", "resnet10t", "resnet", "ok"),
    ("timm", "mobilenetv3_small_050", "mobilenetv3", "ok"),
    ("timm", "convnext_atto", "convnext", "ok"),
    ("timm", "test_nfnet", "nfnet", "ok"),  # ScaledStdConv2d: primaries of their own kind
    ("timm", "vit_tiny_patch16_224", "vision_transformer", "nothing-converted"),
    # hands a parameter view to a submodule (report() must cope); its convs are stem + depthwise
    ("timm", "pit_ti_224", "pit", "nothing-converted"),
    ("transformers", "MobileNetV2ForImageClassification", "image-classification", "ok"),
    ("ultralytics", "yolov8n", "detect", "ok"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("zoo_name", "model", "family", "expected"), FAST, ids=[f[1] for f in FAST]
)
def test_fast_subset(zoo_name: str, model: str, family: str, expected: str) -> None:
    torch.set_num_threads(1)  # oversubscribed CI boxes: far faster
    res = run_job(Job(zoo_name, model, family))
    assert res["status"] == expected, f"{res['status']}: {res.get('error')}"
    assert "original_nonfinite" not in res  # the finiteness checks were really applied
    for mode in res["modes"]:
        assert mode["failures"] == []
        assert mode["converted"] + mode["skipped"] >= res["convs"]
        if expected == "ok":
            assert mode["macs_after"] < mode["macs_before"]
            assert mode["params_after"] < res["params_before"]


def test_ecosystem_jobs_name_their_zoo_and_task() -> None:
    hf, yolo = transformers_jobs(), ultralytics_jobs()
    assert {j.zoo for j in hf} == {"transformers"} and {j.zoo for j in yolo} == {"ultralytics"}
    # the architectures the issue names, and the three YOLO tasks, are all swept
    for name in ("ResNet", "ConvNext", "MobileNetV2", "MobileViT", "RegNet", "Segformer", "Detr"):
        assert any(j.model.startswith(name + "For") for j in hf), name
    assert {"detect", "segment", "classify"} <= {j.family for j in yolo}
    assert job_for("transformers:DetrForObjectDetection") == Job(
        "transformers", "DetrForObjectDetection", "object-detection"
    )
    assert job_for("yolov8n-seg") == Job("ultralytics", "yolov8n-seg", "segment")
    assert len(TRANSFORMERS_MODELS) == len(hf) and len(ULTRALYTICS_MODELS) == len(yolo)


# --- the harness itself: its checks must be able to fail -------------------------------------


def test_signature_compares_structure_not_values() -> None:
    out = {"a": torch.zeros(2, 3), "b": [torch.zeros(4), (torch.ones(1, 2),)]}
    same = {"a": torch.ones(2, 3), "b": [torch.ones(4), (torch.zeros(1, 2),)]}
    assert signature(out) == signature(same)
    other = {"a": torch.zeros(2, 3), "b": [torch.zeros(5), (torch.ones(1, 2),)]}
    assert signature(out) != signature(other)
    where = diff(signature(out), signature(other))
    assert where == "out['b'][0]: expected tensor[4] float32, got tensor[5] float32"


def test_signature_ragged_ignores_detection_counts() -> None:
    a = [{"boxes": torch.zeros(3, 4), "labels": torch.zeros(3, dtype=torch.long)}]
    b = [{"boxes": torch.zeros(7, 4), "labels": torch.zeros(7, dtype=torch.long)}]
    assert signature(a, ragged=True) == signature(b, ragged=True)
    c = [{"boxes": torch.zeros(7, 5), "labels": torch.zeros(7, dtype=torch.long)}]
    assert signature(a, ragged=True) != signature(c, ragged=True)


def test_count_nonfinite_looks_into_nested_outputs() -> None:
    out = {"a": torch.tensor([1.0, math.nan]), "b": [torch.tensor([math.inf, -math.inf, 0.0])]}
    assert count_nonfinite(out) == 3
    assert count_nonfinite({"ints": torch.tensor([1, 2]), "x": torch.zeros(3)}) == 0


def test_unaccounted_convs_are_reported() -> None:
    shared = nn.Conv2d(4, 4, 3)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), shared, nn.Sequential(shared), nn.Conv2d(4, 8, 1))
    original = conv_names(model)
    assert len(original) == 3  # the shared conv counts once, with both of its names
    skipped = [{"name": "0", "reason": "stem"}, {"name": "2.0", "reason": "x"}]
    plan = {"layers": [], "skipped": skipped}
    leftover = ["3", "3 (still a Conv2d, not in skipped)"]
    assert unaccounted_convs(original, plan, model) == leftover
    plan["skipped"].append({"name": "3", "reason": "y"})
    assert unaccounted_convs(original, plan, model) == []


def poisoned_convert(poison: Callable[[ghostify.GhostModule], None]) -> Callable[..., nn.Module]:
    """ghostify.convert, then ``poison`` applied to the first GhostModule of the result."""
    real = ghostify.convert

    def convert(model: nn.Module, **kwargs) -> nn.Module:
        real(model, **kwargs)
        poison(next(m for m in model.modules() if isinstance(m, ghostify.GhostModule)))
        return model

    return convert


def nan_weight(ghost: ghostify.GhostModule) -> None:
    with torch.no_grad():
        ghost.cheap_conv.weight[0] = math.nan


def nan_gradient(ghost: ghostify.GhostModule) -> None:
    ghost.cheap_conv.weight.register_hook(lambda grad: torch.full_like(grad, math.nan))


def test_a_nan_output_is_a_failure(monkeypatch) -> None:
    assert run_job(Job("selftest", "tiny", "selftest"))["status"] == "ok"
    monkeypatch.setattr(ghostify, "convert", poisoned_convert(nan_weight))
    res = run_job(Job("selftest", "tiny", "selftest"))
    assert res["status"] == "fail"
    assert "[both] NaN/Inf in the output" in res["error"], res["error"]


def test_a_nan_gradient_is_a_failure(monkeypatch) -> None:
    monkeypatch.setattr(ghostify, "convert", poisoned_convert(nan_gradient))
    res = run_job(Job("selftest", "tiny", "selftest"))
    assert res["status"] == "fail"
    assert "NaN/Inf in the output" not in res["error"]  # the forward pass is still finite
    assert "[both] NaN/Inf gradient in 1 parameter(s): 2.cheap_conv.weight" in res["error"]


class NanChannel(nn.Module):
    """Sets channel 0 to NaN: a model whose own output is not finite."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.index_fill(1, torch.tensor([0]), math.nan)


def test_nan_the_original_itself_makes_is_not_blamed_on_the_conversion() -> None:
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.Conv2d(16, 32, 3), NanChannel()).eval()
    case = Case(model, (torch.rand(2, 3, 16, 16),), "[2,3,16,16]")
    with torch.no_grad():
        reference = model(*case.args)
    res = check_conversion(case, model, reference, "default")
    assert res["converted"] == 1 and res["failures"] == []


class DroppedBranch(nn.Module):
    """Runs a conv whose output it throws away (HF UperNet's auxiliary head without labels)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 32, 3))
        self.unused = nn.Conv2d(32, 32, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        stem = self.body[1](self.body[0](x))
        y = self.body[2](stem)
        self.unused(y)
        return stem, y


def test_a_ghost_whose_original_gets_no_gradient_either_is_not_blamed(monkeypatch) -> None:
    model = DroppedBranch().eval()
    case = Case(model, (torch.rand(2, 3, 16, 16),), "[2,3,16,16]")
    with torch.no_grad():
        reference = model(*case.args)
    res = check_conversion(case, model, reference, "default")
    assert res["converted"] == 2 and res["failures"] == []
    # but a ghost cut off by the conversion (the original's conv does get a gradient) fails
    detach = poisoned_convert(lambda g: g.register_forward_hook(lambda m, i, out: out.detach()))
    monkeypatch.setattr(ghostify, "convert", detach)
    res = check_conversion(case, model, reference, "default")
    assert any("no gradient reaches 1 GhostModule(s): body.2" in f for f in res["failures"])


def test_runner_survives_timeouts_and_crashes(tmp_path: Path) -> None:
    with Runner(timeout=60, log=tmp_path / "worker.log") as runner:
        crash = runner.run(Job("selftest", "crash", "selftest"))
        assert crash["status"] == "crash", crash
        runner.timeout = 3
        hang = runner.run(Job("selftest", "hang", "selftest"))
        assert hang["status"] == "timeout", hang
        runner.timeout = 120
        ok = runner.run(Job("selftest", "tiny", "selftest"))
        assert ok["status"] == "ok", ok
    assert "--- selftest:tiny" in (tmp_path / "worker.log").read_text()


def test_markdown_has_summary_and_failure_hints() -> None:
    results = {
        "timm:a": {"zoo": "timm", "model": "a", "family": "f1", "status": "ok", "seconds": 1.0},
        "timm:b": {"zoo": "timm", "model": "b", "family": "f2", "status": "timeout", "error": "x"},
    }
    text = coverage.render_markdown(results)
    assert "1/2 models pass" in text
    assert "1/2 architecture families" in text
    assert coverage.HINTS["timeout"] in text


def test_markdown_tables_follow_the_zoo_order() -> None:
    def row(zoo: str) -> dict:
        return {"zoo": zoo, "model": "m", "family": "f", "status": "ok", "seconds": 1.0}

    results = {f"{z}:m": row(z) for z in ("ultralytics", "timm", "transformers", "torchvision")}
    text = coverage.render_markdown(results)
    places = [text.index(f"\n## {zoo}\n") for zoo in coverage.ZOO_ORDER]
    assert places == sorted(places)
    assert "**ultralytics**: 1/1 models pass" in text
    # a partial sweep names what it did not run ("m" is no listed model)
    assert f"**ultralytics**: {len(ULTRALYTICS_MODELS)} listed models not swept yet" in text


# --- the full sweep: pytest -m zoo ---------------------------------------------------------


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "zoo_job" not in metafunc.fixturenames:
        return
    expr = metafunc.config.getoption("markexpr") or ""
    wanted = "zoo" in expr and "not zoo" not in expr  # listing timm costs a minute: only then
    cache = Path(__file__).resolve().parent.parent / "benchmarks" / "out"
    jobs = torchvision_jobs() + timm_jobs("all", cache_dir=cache) if wanted else []
    if wanted:
        jobs += transformers_jobs() + ultralytics_jobs()
    metafunc.parametrize("zoo_job", jobs, ids=[j.key for j in jobs])


@pytest.fixture(scope="session")
def runner(tmp_path_factory: pytest.TempPathFactory):
    with Runner(log=tmp_path_factory.mktemp("zoo") / "worker.log") as runner:
        yield runner


@pytest.mark.zoo
def test_zoo_model(runner: Runner, zoo_job: Job) -> None:
    res = runner.run(zoo_job)
    if res["status"] in ("too-large", "build-error"):
        pytest.skip(f"{res['status']}: {res.get('error')}")
    assert res["status"] in PASSING, f"{res['status']}: {res.get('error')}"


def tiny_keypoint_rcnn() -> nn.Module:
    """torchvision's KeypointRCNN on a two-conv backbone, with small heads, for 64 px images."""
    from torchvision.models.detection import KeypointRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.keypoint_rcnn import KeypointRCNNHeads, KeypointRCNNPredictor
    from torchvision.ops import MultiScaleRoIAlign

    torch.manual_seed(0)
    backbone = nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1)
    )
    backbone.out_channels = 32
    return KeypointRCNN(
        backbone,
        num_classes=2,
        min_size=64,
        max_size=64,
        rpn_anchor_generator=AnchorGenerator(((16, 32),), ((0.5, 1.0, 2.0),)),
        box_roi_pool=MultiScaleRoIAlign(["0"], 7, 2),
        keypoint_roi_pool=MultiScaleRoIAlign(["0"], 14, 2),
        keypoint_head=KeypointRCNNHeads(32, (64, 64)),
        keypoint_predictor=KeypointRCNNPredictor(64, 17),
    ).eval()


def test_detector_macs_are_counted_on_the_same_boxes() -> None:
    """keypointrcnn_resnet50_fpn failed the MAC check (65.2G -> 371.6G): with random weights its
    original kept 13 detections and its converted copy 200, so the keypoint head ran on 13 boxes
    in one count and 200 in the other. Here a score threshold near the untrained 2-class scores
    (0.5) makes the counts differ as much; the check must count both on the same boxes."""
    torch.set_num_threads(1)
    model = tiny_keypoint_rcnn()
    model.roi_heads.score_thresh = 0.5
    images = [torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(s)) for s in (0, 1)]
    with torch.no_grad():  # the sweep's reference run; it also fills RoIAlign's cached scales
        kept = [len(out["boxes"]) for out in model(images)]
    converted = ghostify.convert(copy.deepcopy(model))
    with torch.no_grad():
        assert kept != [len(out["boxes"]) for out in converted(images)]  # the data-dependent part
    boxes: list[int] = []  # what the keypoint predictor saw in each of report()'s four runs
    converted.roi_heads.keypoint_predictor.register_forward_hook(
        lambda _m, inputs, _o: boxes.append(int(inputs[0].shape[0]))
    )
    res = {"converted": 1, "failures": []}
    check_macs(converted, Case(model, (images,), "2x[3,64,64] images"), res, None)
    assert res["failures"] == [] and res["macs_after"] < res["macs_before"]
    assert boxes == [2 * DETECTIONS] * 4
    assert "roi_heads with fixed boxes" in res["macs_source"]
    assert converted.roi_heads.score_thresh == 0.5  # the model is left as it was
    assert converted.roi_heads.detections_per_img == 100
