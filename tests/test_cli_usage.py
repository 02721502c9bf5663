"""The command line refuses what cannot work before any work, with exit status 2, and converts
the user's own weights (``--weights``)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import ghostify
from ghostify import ConfigError, GhostModule
from ghostify.cli import main

TESTS = Path(__file__).resolve().parent


@pytest.fixture
def in_tmp(tmp_path, monkeypatch) -> Path:
    """Run in a temporary folder, with tests/cli_models.py importable as a SPEC module."""
    monkeypatch.syspath_prepend(str(TESTS))
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def no_model_built(monkeypatch) -> None:
    """Fail the test if the command builds a model: the error must come before any work."""

    def refuse(spec: str) -> nn.Module:
        raise AssertionError(f"built {spec} although the command line was unusable")

    monkeypatch.setattr("ghostify.io.specs.build_model", refuse)


def usage_error(argv: list[str], capsys) -> str:
    """Run ``argv``; it must exit with status 2 and one error line, which is returned."""
    try:
        status = main(argv)
    except SystemExit as exit_info:
        status = exit_info.code
    assert status == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line[:1] != "["]
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


# Each command line, run in one fresh interpreter in turn: exit status 2, one error line, and torch
# never imported (it costs seconds; a usage error must answer at once).
NO_TORCH_CASES = {
    "unknown flag": (["convert", "torchvision:resnet18", "--ratios", "2"], "unrecognized"),
    "no SPEC": (["convert"], "the following arguments are required: SPEC"),
    "bare zoo name": (["convert", "resnet50"], "torchvision:resnet50 or timm:resnet50"),
    "bad ratio": (["convert", "torchvision:resnet18", "--ratio", "1"], "--ratio must be"),
    "bad shape": (["convert", "torchvision:resnet18", "--input-shape", "1,3,a"], "--input-shape"),
    "missing weights": (["convert", "torchvision:resnet18", "--weights", "w.pt"], "'w.pt'"),
    "unknown module": (["convert", "no_such_module_xyz:build"], "no module 'no_such_module_xyz'"),
    "missing data": (
        ["convert", "torchvision:resnet18", "--calibration-data", "nope/"],
        "--calibration-data 'nope' does not exist",
    ),
    "empty folder": (
        ["convert", "torchvision:resnet18", "--calibration-data", "empty"],
        "'empty' holds no image",
    ),
    "unknown data file": (
        ["convert", "torchvision:resnet18", "--calibration-data", "notes.txt"],
        "unknown kind of file '.txt'",
    ),
    "samples without data": (["convert", "torchvision:resnet18", "--samples", "8"], "--samples"),
    "finetune without data": (
        ["convert", "torchvision:resnet18", "--finetune-epochs", "1"],
        "--finetune-epochs only apply with --calibration-data",
    ),
    "data with scratch": (
        ["convert", "torchvision:resnet18", "--calibration-data", "x.npy", "--init", "scratch"],
        "needs --init weights",
    ),
    "mean for a tensor file": (
        ["convert", "torchvision:resnet18", "--calibration-data", "x.npy", "--mean", "0.5"],
        "--mean/--std normalise images",
    ),
    "images of rank 3": (
        [
            "convert",
            "torchvision:resnet18",
            "--calibration-data",
            "images",
            "--input-shape",
            "1,3,8",
        ],
        "images are read as N,C,H,W",
    ),
    "output folder missing": (
        ["convert", "torchvision:resnet18", "--out", "no/such/c.pt"],
        "the folder 'no/such' does not exist",
    ),
    "budget beside a ratio": (
        ["convert", "torchvision:resnet18", "--speedup", "1.5", "--ratio", "3"],
        "--speedup chooses every layer's ratio and dw_size, so --ratio cannot",
    ),
    "two budgets": (
        ["convert", "torchvision:resnet18", "--macs", "0.5", "--params", "0.5"],
        "not allowed with argument --macs",
    ),
    "speed-up of 1 or less": (
        ["convert", "torchvision:resnet18", "--speedup", "0.9"],
        "--speedup must be a number > 1",
    ),
    "MAC fraction over 1": (
        ["convert", "torchvision:resnet18", "--macs", "1.5"],
        "--macs must be a fraction in (0, 1]",
    ),
    "runtime without a speed-up": (
        ["convert", "torchvision:resnet18", "--macs", "0.5", "--runtime", "onnxruntime"],
        "--macs counts, not times",
    ),
    "missing checkpoint": (["report", "c.pt"], "checkpoint 'c.pt' does not exist"),
    "deploy saves nothing": (["deploy", "x.npy"], "deploy needs --out CKPT and/or --onnx FILE"),
}

_RUNNER = """
import json, sys
from ghostify.cli import main
results = {}
for name, argv in json.loads(sys.argv[1]).items():
    try:
        status = main(argv)
    except SystemExit as exit_info:
        status = exit_info.code
    results[name] = [status, "torch" in sys.modules]
print(json.dumps(results))
"""


def test_usage_errors_exit_2_before_torch_is_imported(tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(b"never read")
    (tmp_path / "notes.txt").write_text("not data")
    (tmp_path / "x.npy").write_bytes(b"never read")
    argvs = {name: argv for name, (argv, _) in NO_TORCH_CASES.items()}
    done = subprocess.run(
        [sys.executable, "-c", _RUNNER, json.dumps(argvs)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    results = json.loads(done.stdout)
    errors = [line for line in done.stderr.splitlines() if line]
    assert len(errors) == len(NO_TORCH_CASES), done.stderr  # one line each, no traceback
    for (name, (_, message)), line in zip(NO_TORCH_CASES.items(), errors, strict=True):
        status, torch_imported = results[name]
        assert status == 2, (name, line)
        assert message in line, (name, line)
        assert not torch_imported, f"{name}: torch was imported before the usage error"


def test_import_ghostify_does_not_import_torch() -> None:
    code = (
        "import sys, ghostify\n"
        "ghostify.ConfigError\n"
        "print('torch' in sys.modules)\n"
        "ghostify.GhostModule  # the first real use imports it\n"
        "print('torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False", "True"]


def test_the_main_command_needs_no_compiled_extra(tmp_path) -> None:
    """Without lapjv (the ``fast`` extra, built from source), convert fits with scipy's solver."""
    code = (
        "import sys; sys.modules['lapjv'] = None  # as if not installed: importing it fails\n"
        "from ghostify.cli import main\n"
        "status = main(['convert', 'ghostify.testing.digits:make_cnn', '--input-shape', "
        "'1,1,8,8', '-q'])\n"
        "assert 'lapjv' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
        "sys.exit(status)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr


def test_every_public_name_resolves() -> None:
    """The lazy package still has every name it lists, and ``import *`` brings them all."""
    assert set(dir(ghostify)) >= set(ghostify.__all__)
    for name in ghostify.__all__:
        assert getattr(ghostify, name) is not None, name
    namespace: dict = {}
    exec("from ghostify import *", namespace)
    assert set(ghostify.__all__) <= set(namespace)
    assert callable(ghostify.deploy) and callable(ghostify.fit) and callable(ghostify.report)
    assert ghostify.tune.Calibration is ghostify.Calibration  # sub-packages as attributes
    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        _ = ghostify.no_such_name


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--ratio", "1", "--ratio must be an int >= 2"),
        ("--ratio", "0", "--ratio must be an int >= 2"),
        ("--ratio", "abc", "--ratio must be an int; got 'abc'"),
        ("--dw-size", "2", "--dw-size must be an odd int >= 1 or 'auto'"),
        ("--dw-size", "x", "--dw-size must be an int; got 'x'"),
    ],
)
def test_bad_numbers_are_usage_errors(option, value, message, capsys, no_model_built) -> None:
    assert message in usage_error(["convert", "torchvision:resnet18", option, value], capsys)


@pytest.mark.parametrize("option", ["--out", "--report", "--markdown", "--csv", "--chart"])
def test_an_output_in_a_missing_folder_fails_before_any_work(
    option, in_tmp, capsys, no_model_built
) -> None:
    name = "missing/out.png" if option == "--chart" else "missing/out.file"
    line = usage_error(["convert", "torchvision:resnet18", option, name], capsys)
    assert f"{option} '{name}'" in line and "'missing' does not exist" in line


def test_an_output_that_is_a_folder_or_a_chart_of_unknown_type(
    in_tmp, capsys, no_model_built
) -> None:
    (in_tmp / "folder").mkdir()
    line = usage_error(["convert", "torchvision:resnet18", "--report", "folder"], capsys)
    assert "is a folder" in line
    line = usage_error(["convert", "torchvision:resnet18", "--chart", "c.jpg"], capsys)
    assert "must end in .png, .svg, .pdf" in line
    line = usage_error(["report", "r.pt", "--chart", "c.txt"], capsys)
    assert "checkpoint 'r.pt' does not exist" in line  # inputs first
    (in_tmp / "r.pt").write_text("not read: the command line is refused first")
    line = usage_error(["report", "r.pt", "--chart", "c.txt"], capsys)
    assert "--chart 'c.txt'" in line


def test_a_missing_weights_file_is_a_usage_error(in_tmp, capsys, no_model_built) -> None:
    line = usage_error(["convert", "torchvision:resnet18", "--weights", "nope.pt"], capsys)
    assert "--weights 'nope.pt' does not exist" in line


@pytest.mark.parametrize("shape", ["1,3,32", "3,32,32,1,1", "1,4,32,32"])
def test_an_input_the_first_convolution_cannot_take(shape, capsys) -> None:
    line = usage_error(["convert", "torchvision:resnet18", "--input-shape", shape], capsys)
    assert f"--input-shape {shape} does not fit torchvision:resnet18" in line
    assert "(conv1, Conv2d, 3 input channels) takes N,C,H,W inputs with C=3" in line


def test_a_model_that_reshapes_its_input_is_not_refused(in_tmp, capsys) -> None:
    argv = ["convert", "cli_models:takes_3d", "--input-shape", "2,12,12", "--no-skip-stem", "-q"]
    assert main(argv) == 0


@pytest.mark.parametrize("where", ["before", "after"])
def test_traceback_is_accepted_before_or_after_the_subcommand(where, in_tmp) -> None:
    argv = ["convert", "torchvision:no_such_net"]
    argv = ["--traceback", *argv] if where == "before" else [*argv, "--traceback"]
    with pytest.raises(ConfigError, match="unknown torchvision model 'no_such_net'"):
        main(argv)


def test_without_traceback_an_error_is_one_line(in_tmp, capsys) -> None:
    assert main(["convert", "torchvision:no_such_net", "-q"]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_chart_help_names_every_format(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert ".png, .svg or .pdf" in text and "--weights" in text


# -- --weights -----------------------------------------------------------------------------------


def train_digits_cnn(steps: int = 30) -> nn.Sequential:
    """cli_models.digits_cnn trained for a few Adam steps on scikit-learn's digits."""
    import cli_models
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16
    labels = torch.tensor(digits.target)
    model = cli_models.digits_cnn()
    optimiser = torch.optim.Adam(model.parameters(), 1e-2)
    for step in range(steps):
        batch = slice(64 * step % 1700, 64 * step % 1700 + 64)
        optimiser.zero_grad()
        nn.functional.cross_entropy(model(images[batch]), labels[batch]).backward()
        optimiser.step()
    return model.eval()


def test_weights_round_trip_keeps_the_trained_filters(in_tmp, capsys) -> None:
    import cli_models

    trained = train_digits_cnn()
    untrained = cli_models.digits_cnn().state_dict()
    assert not torch.equal(trained[3].weight, untrained["3.weight"])  # training changed it
    torch.save(trained.state_dict(), "trained.pt")
    argv = ["convert", "cli_models:digits_cnn", "--weights", "trained.pt", "--input-shape"]
    assert main([*argv, "1,1,8,8", "--out", "ghost.pt", "-q"]) == 0

    saved = torch.load("ghost.pt", weights_only=True)
    rebuilt = ghostify.convert(cli_models.digits_cnn(), plan=saved["plan"])
    rebuilt.load_state_dict(saved["state_dict"])
    x = torch.rand(16, 1, 8, 8)
    converted = [name for name, m in rebuilt.named_modules() if isinstance(m, GhostModule)]
    assert converted == ["3", "6"]  # the stem (0) is skipped
    # Layer 3 reads the untouched stem's output: each of its intrinsic channels must be one of
    # the trained layer's channels, exactly (its filters are the trained filters).
    stem = trained[:3]
    with torch.no_grad():
        reference = trained[3](stem(x))  # (N, 16, H, W)
        kept = rebuilt[3].primary_conv(stem(x))  # (N, 8, H, W), in the module's own order
    distance = (kept[:, :, None] - reference[:, None]).abs().flatten(3).amax(dim=(0, 3))
    assert (distance.min(dim=1).values < 1e-5).all()
    assert len(set(distance.argmin(dim=1).tolist())) == rebuilt[3].intrinsic_channels
    # And the whole checkpoint is what converting the trained model in Python gives.
    with pytest.warns(ghostify.TrainedWeightsWarning):  # data-free on trained weights, on purpose
        in_python = ghostify.convert(copy.deepcopy(trained), example_inputs=torch.rand(1, 1, 8, 8))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), in_python.eval()(x))


def test_weights_that_do_not_fit_name_the_keys(in_tmp, capsys) -> None:
    import cli_models

    state = cli_models.digits_cnn().state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["0.bias"]
    state["3.weight"] = torch.zeros(4, 8, 3, 3)
    torch.save(state, "bad.pt")
    argv = ["convert", "cli_models:digits_cnn", "--weights", "bad.pt", "--input-shape", "1,1,8,8"]
    assert main(argv) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--weights 'bad.pt' does not fit cli_models:digits_cnn" in line
    assert "missing key(s): 0.bias" in line and "unexpected key(s): extra.weight" in line
    assert "3.weight (file (4, 8, 3, 3), model (16, 8, 3, 3))" in line


def test_weights_must_be_a_state_dict(in_tmp, capsys) -> None:
    torch.save([torch.zeros(1)], "list.pt")
    Path("text.pt").write_text("not a tensor file")
    argv = ["convert", "cli_models:digits_cnn", "--input-shape", "1,1,8,8", "--weights"]
    assert main([*argv, "list.pt"]) == 1
    assert "holds a list, not a state_dict" in capsys.readouterr().err
    assert main([*argv, "text.pt"]) == 1
    assert "cannot read --weights 'text.pt'" in capsys.readouterr().err


def test_deploy_folds_a_checkpoint_and_exports_onnx_that_agrees(in_tmp, capsys) -> None:
    pytest.importorskip("onnxruntime")
    assert main(["convert", "cli_models:digits_cnn", "--input-shape", "2,1,8,8", "--out", "c.pt",
                 "-q"]) == 0  # fmt: skip
    assert main(["deploy", "c.pt", "--onnx", "c.onnx"]) == 0
    printed = capsys.readouterr().out
    assert "2 BatchNorm(s) folded, 0 left" in printed  # both BatchNorms follow a conv
    import onnxruntime

    session = onnxruntime.InferenceSession("c.onnx", providers=["CPUExecutionProvider"])
    payload = ghostify.io.checkpoint.load_checkpoint(in_tmp / "c.pt")
    model = ghostify.io.checkpoint.load_model(payload)
    x = torch.randn(3, 1, 8, 8)  # another batch size than the one exported with
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), model(x), rtol=1e-3, atol=1e-4)


def test_deploy_checks_its_paths_first(in_tmp, capsys) -> None:
    message = usage_error(["deploy", "missing.pt", "--onnx", "x.onnx"], capsys)
    assert "checkpoint 'missing.pt' does not exist" in message
    (in_tmp / "c.pt").write_text("not read: the command line is refused first")
    message = usage_error(["deploy", "c.pt", "--onnx", "no/such/folder/x.onnx"], capsys)
    assert "--onnx 'no/such/folder/x.onnx': the folder 'no/such/folder' does not exist" in message
    message = usage_error(["deploy", "c.pt"], capsys)
    assert "deploy needs --out CKPT and/or --onnx FILE" in message
    message = usage_error(["deploy", "c.pt", "--out", "c.pt"], capsys)
    assert "--out 'c.pt' would overwrite the checkpoint it reads" in message
