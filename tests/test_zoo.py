"""Model-zoo coverage: a fast representative subset by default, the full sweep with ``-m zoo``.

The subset covers one model per kind of output or failure mode the sweep has met: plain tensors,
dict outputs (segmentation), lists of dicts with a train-mode loss (detection), two inputs and a
list of outputs (optical flow), Conv3d only (video), fixed image sizes (ViT-likes),
``Conv2d`` subclasses (timm's ScaledStdConv2d, converted exactly) and convs reached only in
training mode.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import zoo

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
]  # fmt: skip


@pytest.fixture(scope="module")
def lib() -> dict:
    return zoo.library()


@pytest.mark.parametrize(
    ("zoo_name", "model", "family", "expected"), FAST, ids=[f[1] for f in FAST]
)
def test_fast_subset(lib: dict, zoo_name: str, model: str, family: str, expected: str) -> None:
    torch.set_num_threads(1)  # oversubscribed CI boxes: far faster
    res = zoo.run_job(zoo.Job(zoo_name, model, family), lib)
    assert res["status"] == expected, f"{res['status']}: {res.get('error')}"
    for mode in res["modes"]:
        assert mode["failures"] == []
        assert mode["converted"] + mode["skipped"] >= res["convs"]
        if expected == "ok":
            assert mode["macs_after"] < mode["macs_before"]
            assert mode["params_after"] < res["params_before"]


# --- the harness itself: its checks must be able to fail -------------------------------------


def test_signature_compares_structure_not_values() -> None:
    out = {"a": torch.zeros(2, 3), "b": [torch.zeros(4), (torch.ones(1, 2),)]}
    same = {"a": torch.ones(2, 3), "b": [torch.ones(4), (torch.zeros(1, 2),)]}
    assert zoo.signature(out) == zoo.signature(same)
    other = {"a": torch.zeros(2, 3), "b": [torch.zeros(5), (torch.ones(1, 2),)]}
    assert zoo.signature(out) != zoo.signature(other)
    where = zoo.diff(zoo.signature(out), zoo.signature(other))
    assert where == "out['b'][0]: expected tensor[4] float32, got tensor[5] float32"


def test_signature_ragged_ignores_detection_counts() -> None:
    a = [{"boxes": torch.zeros(3, 4), "labels": torch.zeros(3, dtype=torch.long)}]
    b = [{"boxes": torch.zeros(7, 4), "labels": torch.zeros(7, dtype=torch.long)}]
    assert zoo.signature(a, ragged=True) == zoo.signature(b, ragged=True)
    c = [{"boxes": torch.zeros(7, 5), "labels": torch.zeros(7, dtype=torch.long)}]
    assert zoo.signature(a, ragged=True) != zoo.signature(c, ragged=True)


def test_unaccounted_convs_are_reported() -> None:
    shared = nn.Conv2d(4, 4, 3)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), shared, nn.Sequential(shared), nn.Conv2d(4, 8, 1))
    original = zoo.conv_names(model)
    assert len(original) == 3  # the shared conv counts once, with both of its names
    skipped = [{"name": "0", "reason": "stem"}, {"name": "2.0", "reason": "x"}]
    plan = {"layers": [], "skipped": skipped}
    leftover = ["3", "3 (still a Conv2d, not in skipped)"]
    assert zoo.unaccounted_convs(original, plan, model) == leftover
    plan["skipped"].append({"name": "3", "reason": "y"})
    assert zoo.unaccounted_convs(original, plan, model) == []


def test_runner_survives_timeouts_and_crashes(tmp_path: Path) -> None:
    runner = zoo.Runner(timeout=60, log=tmp_path / "worker.log")
    try:
        crash = runner.run(zoo.Job("selftest", "crash", "selftest"))
        assert crash["status"] == "crash", crash
        runner.timeout = 3
        hang = runner.run(zoo.Job("selftest", "hang", "selftest"))
        assert hang["status"] == "timeout", hang
        runner.timeout = 120
        ok = runner.run(zoo.Job("selftest", "tiny", "selftest"))
        assert ok["status"] == "ok", ok
    finally:
        runner.close()


def test_markdown_has_summary_and_failure_hints() -> None:
    results = {
        "timm:a": {"zoo": "timm", "model": "a", "family": "f1", "status": "ok", "seconds": 1.0},
        "timm:b": {"zoo": "timm", "model": "b", "family": "f2", "status": "timeout", "error": "x"},
    }
    text = zoo.render_markdown(results)
    assert "1/2 models pass" in text
    assert "1/2 architecture families" in text
    assert zoo.HINTS["timeout"] in text


# --- the full sweep: pytest -m zoo ---------------------------------------------------------


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "zoo_job" not in metafunc.fixturenames:
        return
    expr = metafunc.config.getoption("markexpr") or ""
    wanted = "zoo" in expr and "not zoo" not in expr  # listing timm costs a minute: only then
    jobs = zoo.torchvision_jobs() + zoo.timm_jobs("all") if wanted else []
    metafunc.parametrize("zoo_job", jobs, ids=[j.key for j in jobs])


@pytest.fixture(scope="session")
def runner():
    runner = zoo.Runner()
    yield runner
    runner.close()


@pytest.mark.zoo
def test_zoo_model(runner: zoo.Runner, zoo_job: zoo.Job) -> None:
    res = runner.run(zoo_job)
    if res["status"] in ("too-large", "build-error"):
        pytest.skip(f"{res['status']}: {res.get('error')}")
    assert res["status"] in zoo.PASSING, f"{res['status']}: {res.get('error')}"
