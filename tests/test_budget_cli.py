"""`ghostify convert SPEC --macs F` (--params, --speedup): the budget from the command line."""

from __future__ import annotations

import json

from ghostify.cli import main


def test_a_mac_budget_from_the_command_line(tmp_path, capsys, monkeypatch) -> None:
    (tmp_path / "budget_models.py").write_text(
        "from torch import nn\n"
        "def net():\n"
        "    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),\n"
        "                         nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),\n"
        "                         nn.Conv2d(32, 32, 3, padding=1))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    argv = ["convert", "budget_models:net", "--input-shape", "1,3,12,12", "--macs", "0.6"]
    assert main([*argv, "--report", "savings.json"]) == 0
    captured = capsys.readouterr()
    assert "converting to a budget: at most 0.6 of the original's MACs" in captured.err
    assert "budget: at most 0.6 of the original's MACs: kept 0." in captured.out
    totals = json.loads((tmp_path / "savings.json").read_text())["totals"]
    assert totals["macs_after"] <= 0.6 * totals["macs_before"]
