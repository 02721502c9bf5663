"""The ``ghostify`` command line: end to end in a subprocess, then each error case."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

import ghostify
from ghostify.cli import main
from ghostify.errors import ConfigError, GhostifyError
from ghostify.io import checkpoint, specs

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    from fvcore.nn import parameter_count

SCRIPT = Path(sys.executable).with_name("ghostify")


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run the installed console script (or the module, from a bare source tree)."""
    command = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "ghostify.cli"]
    return subprocess.run(
        [*command, *args], cwd=cwd, capture_output=True, text=True, timeout=300, check=False
    )


@pytest.fixture(scope="module")
def converted_files(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """``ghostify convert`` on resnet18 at 32x32, writing every output."""
    out = tmp_path_factory.mktemp("cli")
    done = run_cli(
        "convert",
        "torchvision:resnet18",
        "--input-shape",
        "1,3,32,32",
        "--init",
        "scratch",
        "--exclude",
        "layer4.1.*",
        "--out",
        "r18.pt",
        "--report",
        "savings.json",
        "--markdown",
        "savings.md",
        "--csv",
        "savings.csv",
        "--chart",
        "savings.svg",
        cwd=out,
    )
    return out, done


def test_convert_end_to_end(converted_files, fvcore_macs) -> None:
    out, done = converted_files
    assert done.returncode == 0, done.stderr
    assert "total (whole model)" in done.stdout and "Traceback" not in done.stderr
    assert "tracing and counting" in done.stderr  # progress goes to stderr, the table to stdout
    data = json.loads((out / "savings.json").read_text())
    x = torch.randn(1, 3, 32, 32)
    original = torchvision.models.resnet18(weights=None)
    assert data["totals"]["macs_before"] == fvcore_macs(original, x)
    assert data["totals"]["params_before"] == parameter_count(original)[""]
    # The converted model, rebuilt independently of the CLI from the checkpoint's contents.
    saved = torch.load(out / "r18.pt", weights_only=True)
    model = torchvision.models.resnet18(weights=None)
    ghostify.convert(model, plan=saved["plan"], init="scratch")
    model.load_state_dict(saved["state_dict"], strict=True)
    assert data["totals"]["macs_after"] == fvcore_macs(model, x)
    assert data["totals"]["params_after"] == parameter_count(model)[""]
    skipped = {row["name"]: row["reason"] for row in data["skipped"]}
    assert set(skipped) == {"conv1", "layer4.1.conv1", "layer4.1.conv2"}
    assert "layer4.1.*" in skipped["layer4.1.conv1"]
    assert data["provenance"]["spec"] == "torchvision:resnet18"
    assert data["conventions"]["inputs"] == [{"shape": [1, 3, 32, 32], "dtype": "float32"}]
    rows = list(csv.DictReader((out / "savings.csv").open()))
    assert len(rows) == len(data["layers"]) + len(data["skipped"]) + 2  # + the rest, the total
    assert "| `layer1.0.conv1` |" in (out / "savings.md").read_text()
    assert b"<svg" in (out / "savings.svg").read_bytes()


def test_checkpoint_format(converted_files) -> None:
    out, _ = converted_files
    saved = torch.load(out / "r18.pt", weights_only=True)
    assert saved["format"] == checkpoint.FORMAT and saved["version"] == checkpoint.VERSION
    assert saved["spec"] == "torchvision:resnet18" and saved["input_shape"] == [1, 3, 32, 32]
    assert saved["plan"]["schema"] == "ghostify.plan/2" and saved["ghostify_version"]
    assert saved["plan"]["options"]["exclude"] == ["layer4.1.*"]


def test_report_from_checkpoint_reproduces_the_report(converted_files) -> None:
    out, _ = converted_files
    done = run_cli("report", "r18.pt", "--report", "again.json", "--quiet", cwd=out)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and done.stderr == ""  # --quiet
    assert (out / "again.json").read_bytes() == (out / "savings.json").read_bytes()


def test_a_bad_spec_is_a_usage_error_in_one_line_without_traceback(tmp_path) -> None:
    done = run_cli("convert", "torchvision:resnet_nope", "--quiet", cwd=tmp_path)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("ghostify convert: error: unknown torchvision model 'resnet_nope'")


# -- error cases, in process (main returns the exit status) --------------------------------------


def error_line(capsys) -> str:
    """The one error line on stderr (progress lines, which start with "[", aside)."""
    captured = capsys.readouterr()
    lines = [line for line in captured.err.strip().splitlines() if not line.startswith("[")]
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    return lines[0]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["convert", "torchvision:no_such_net", "-q"], "unknown torchvision model 'no_such_net'"),
        (["convert", "timm:no_such_net", "-q"], "unknown timm model 'no_such_net'"),
        (["convert", "resnet18", "-q"], "model SPEC must look like torchvision:NAME"),
        (["convert", "no_such_package_xyz:make", "-q"], "cannot import 'no_such_package_xyz'"),
        (["convert", "json:dumps", "-q"], "calling 'json:dumps' with no arguments failed"),
        (["report", "missing.pt", "-q"], "checkpoint 'missing.pt' does not exist"),
    ],
)
def test_a_spec_or_file_that_names_nothing_is_a_usage_error(
    argv, message, capsys, tmp_path, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert message in error_line(capsys)


@pytest.mark.parametrize("shape", ["1,3,a,32", "1,3,0,32", "", "1,,3"])
def test_a_malformed_input_shape_is_a_usage_error(shape, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", "torchvision:resnet18", "--input-shape", shape])
    assert exit_info.value.code == 2
    assert "--input-shape must be comma-separated positive integers" in error_line(capsys)


def test_files_that_are_not_ghostify_checkpoints(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("notes.txt").write_text("hello")
    torch.save({"weights": torch.ones(2)}, "plain.pt")
    torch.save({"module": nn.Linear(2, 2)}, "pickled.pt")  # needs unpickling: refused
    assert main(["report", "notes.txt"]) == 1
    assert "'notes.txt' is not a ghostify checkpoint" in error_line(capsys)
    assert main(["report", "plain.pt"]) == 1
    assert "expected a dict with format='ghostify.checkpoint'" in error_line(capsys)
    assert main(["report", "pickled.pt"]) == 1
    assert "never unpickles" in error_line(capsys)


def test_missing_command_and_spec(capsys) -> None:
    assert main([]) == 2  # no default command: help goes to stderr
    assert "convert" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["convert"])
    assert exit_info.value.code == 2
    assert "required: SPEC" in error_line(capsys)


def test_version_and_help(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith(f"ghostify {ghostify.__version__}")
    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    text = capsys.readouterr().out
    for option in ("--ratio", "--dw-size", "--include", "--exclude", "--init", "--skip-stem"):
        assert option in text
    assert "examples:" in text and "torchvision:resnet50" in text


def test_factory_spec_and_report_round_trip_in_process(tmp_path, capsys, monkeypatch) -> None:
    (tmp_path / "my_models.py").write_text(
        "from torch import nn\n"
        "def tiny():\n"
        "    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 16, 3), nn.ReLU())\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    argv = ["convert", "my_models:tiny", "--input-shape", "1,3,10,10", "--out", "t.pt"]
    assert main([*argv, "--report", "a.json", "--no-batchnorm"]) == 0
    captured = capsys.readouterr()
    assert "total (whole model)" in captured.out and "building my_models:tiny" in captured.err
    data = json.loads(Path("a.json").read_text())
    # conv 8 -> 16, 3x3 on an 8x8 input: 16 * 8 * 9 * 6 * 6 MACs, halved plus depthwise ghosts.
    (row,) = data["layers"]
    assert (row["name"], row["macs_before"]) == ("1", 16 * 8 * 9 * 6 * 6)
    assert row["macs_after"] == 8 * 8 * 9 * 6 * 6 + 8 * 9 * 6 * 6
    assert data["conventions"]["batchnorm_included"] is False
    assert main(["report", "t.pt", "--report", "b.json", "--no-batchnorm", "-q"]) == 0
    assert Path("b.json").read_text() == Path("a.json").read_text()
    assert main(["report", "t.pt", "--input-shape", "1,4,10,10", "-q"]) == 2  # usage error
    assert "--input-shape 1,4,10,10 does not fit my_models:tiny" in error_line(capsys)


def test_specs_build_models_without_weights() -> None:
    model = specs.build_model("torchvision:resnet18")
    assert type(model).__name__ == "ResNet"
    assert type(specs.build_model("timm:resnet10t")).__name__ == "ResNet"
    with pytest.raises(ConfigError, match="did you mean resnet18"):
        specs.build_model("torchvision:resnet1")
    with pytest.raises(ConfigError, match="not a torch.nn.Module"):
        specs.build_model("builtins:dict")


def test_a_checkpoint_whose_weights_do_not_fit(tmp_path) -> None:
    model = ghostify.convert(torchvision.models.resnet18(weights=None), init="scratch")
    plan = ghostify.plan_of(model)
    path = checkpoint.save_checkpoint(
        tmp_path / "r.pt", model, spec="torchvision:resnet34", plan=plan
    )
    with pytest.raises(GhostifyError, match="convolution.* the plan does not mention"):
        checkpoint.load_model(checkpoint.load_checkpoint(path))
