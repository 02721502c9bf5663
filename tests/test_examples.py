"""The examples run as a user runs them (a subprocess in an empty folder), and do what they say."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from docs_blocks import ROOT, blocks, environment, pages  # tests/docs_blocks.py

EXAMPLES = ROOT / "examples"


def run(command: list[str], folder: Path) -> str:
    done = subprocess.run(
        command, cwd=folder, env=environment(), capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, f"{command}: exit {done.returncode}\n{done.stderr[-4000:]}"
    return done.stdout


def test_trained_model_pipeline(tmp_path: Path) -> None:
    out = run([sys.executable, str(EXAMPLES / "trained_model.py"), "--samples", "256"], tmp_path)
    agreement = {
        step.strip(): float(value)
        for step, value in re.findall(r"^(.+?) accuracy .* original +([\d.]+)%$", out, re.M)
    }
    assert list(agreement) == [
        "trained",
        "converted, calibrated",
        "fine-tuned by distillation",
        "deployed",
    ]
    assert agreement["converted, calibrated"] >= 95  # the data-free default keeps ~20-40%
    assert agreement["deployed"] == agreement["fine-tuned by distillation"]  # deploy is exact
    assert (tmp_path / "ghostify-out" / "digits-ghost.onnx").stat().st_size > 10_000


def test_audit_report(tmp_path: Path) -> None:
    out = run([sys.executable, str(EXAMPLES / "audit_report.py"), "--size", "64"], tmp_path)
    assert "kept as it was: conv1 (network stem" in out
    folder = tmp_path / "ghostify-out"
    report = json.loads((folder / "savings.json").read_text())
    totals = report["totals"]
    assert totals["macs_after"] < totals["macs_before"]
    assert f"MACs {totals['macs_before']:,} -> {totals['macs_after']:,}" in out
    assert (folder / "savings.png").read_bytes()[:4] == b"\x89PNG"
    assert len((folder / "savings.csv").read_text().splitlines()) > len(report["layers"])
    assert "savings.png" in (folder / "savings.md").read_text()


def test_command_line_script(tmp_path: Path) -> None:
    out = run(["bash", str(EXAMPLES / "command_line.sh"), "work"], tmp_path)
    work = tmp_path / "work"
    assert "3 layers converted" in out  # the digits CNN's four convs less the stem
    for name in ("digits-ghost.onnx", "digits-deployed.pt", "savings.md"):
        assert (work / name).is_file(), name


def test_every_example_runs_here_and_is_shown_in_the_docs() -> None:
    """Each example file is run by a test above (or imported by one that is) and shown in a page."""
    tested = set(re.findall(r'EXAMPLES / "([\w.]+)"', Path(__file__).read_text()))
    shown = {b.example for page in pages() for b in blocks(page) if b.example}
    for path in sorted(EXAMPLES.iterdir()):
        if path.name == "__pycache__":
            continue
        assert path.name in tested or path.name in {"digits_cnn.py"}, path
        assert f"examples/{path.name}" in shown, f"examples/{path.name} is shown in no docs page"
