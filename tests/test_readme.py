"""README.md is a front page: short, its two commands are the ones CI and users run, and every
code block in it runs (or says why it does not)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from docs_blocks import ROOT, blocks, load_hooks, run_page

README = ROOT / "README.md"  # ROOT etc.: tests/docs_blocks.py


def commands() -> dict[str, str]:
    """README's two commands, by the heading text just above each block."""
    text = README.read_text()
    found = re.findall(r"^(.*):\n\n<!-- not run: [^\n]* -->\n```bash\n(.+?)\n```", text, re.M)
    return {intro: command for intro, command in found}


def test_readme_is_a_front_page() -> None:
    assert len(README.read_text().splitlines()) <= 250


def test_readme_code_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # examples write their files to the working directory
    assert run_page(README, tmp_path) >= 1


def test_ci_runs_readme_test_command_exactly() -> None:
    (test_command,) = [c for intro, c in commands().items() if "tests" in intro]
    assert test_command == 'pip install -e ".[test]" && pytest'
    assert f"({test_command})" in (ROOT / ".ci" / "run").read_text()


def test_readme_main_command_installs_from_wheels_and_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """No compiled extra (`fast` builds lapjv from source) in the main command; its ghostify
    part runs as written (through the console script's own entry point, in this process)."""
    from ghostify.cli import main

    (command,) = [c for intro, c in commands().items() if "main job" in intro]
    install, run = command.split(" && ")
    extras = re.search(r'"\.\[(.*)\]"', install)[1].split(",")
    assert "fast" not in extras and "test" not in extras
    program, *arguments = shlex.split(run)
    assert program == "ghostify" and arguments[0] == "convert"
    monkeypatch.chdir(tmp_path)
    assert main(arguments) == 0
    assert "layers converted" in capsys.readouterr().out


def test_every_block_is_run_or_says_why() -> None:
    for block in blocks(README):
        assert block.language, f"{block.where}: name the block's language"
        assert block.runner or block.not_run or block.example or block.same_as, block.where


def test_readme_tables_are_the_result_files() -> None:
    """README's tables are rendered into it from benchmarks/results (GitHub shows the file as it
    is); `python docs/mkdocs/hooks.py README.md` renders them again after a benchmark run."""
    hooks = load_hooks()
    text = README.read_text()
    assert "<!-- /table -->" in text
    assert hooks.render_in_place(text, "README.md") == text


def test_readme_links_resolve() -> None:
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README.read_text()):
        if not target.startswith(("http://", "https://")):
            assert (ROOT / target).exists(), f"README links to {target}, which does not exist"
