"""The documentation site builds strictly, its tables come from result files, and every code
block of README.md and docs/ runs (or says why it does not)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from docs_blocks import (
    DOCS,
    ROOT,
    SHELL_COMMANDS,
    Block,
    blocks,
    environment,
    load_hooks,
    pages,
    run_page,
    unrunnable,
)

from ghostify.testing.results import Table, write_results

CONFIG = DOCS / "mkdocs" / "mkdocs.yml"  # DOCS, ROOT, ...: tests/docs_blocks.py
API_PAGE = DOCS / "reference" / "api.md"


def build(config: Path, site: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
        cwd=ROOT,  # the snippets extension reads `--8<--` paths from the working folder
        env={**environment(), "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_site_builds_strictly(tmp_path: Path) -> None:
    """A broken link, a page left out of the nav, a missing page or a renamed function in the
    API reference is a warning, and --strict turns it into a failed build."""
    done = build(CONFIG, tmp_path / "site")
    assert done.returncode == 0, done.stderr[-5000:]
    assert (tmp_path / "site" / "index.html").is_file()


def test_strict_build_fails_on_a_broken_link(tmp_path: Path) -> None:
    """The same configuration over a one-page site with a link to a page that does not exist."""
    pages_dir = tmp_path / "pages"
    (pages_dir / "mkdocs").mkdir(parents=True)
    (pages_dir / "index.md").write_text("# Home\n\nSee [the guide](guides/missing.md).\n")
    config = CONFIG.read_text()
    nav_at = config.index("\nnav:")
    (pages_dir / "mkdocs" / "mkdocs.yml").write_text(config[:nav_at] + "\nnav:\n  - index.md\n")
    (pages_dir / "mkdocs" / "hooks.py").write_text((CONFIG.parent / "hooks.py").read_text())
    done = build(pages_dir / "mkdocs" / "mkdocs.yml", tmp_path / "site")
    assert done.returncode != 0
    assert "guides/missing.md" in done.stderr


def test_table_markers_render_from_result_files(tmp_path: Path) -> None:
    hooks = load_hooks()
    table = Table("main", "Speed-up", ["model", "x"], [["resnet50", 1.5]], notes="Medians.")
    write_results("demo", [table], command="python benchmarks/demo.py", directory=tmp_path)
    page = "Before.\n\n<!-- table: demo/main -->\n\nAfter.\n"
    rendered = hooks.render_tables(page, "page.md", tmp_path)
    assert "<!-- table" not in rendered
    assert "| resnet50 | 1.5 |" in rendered and "Medians." in rendered
    assert rendered.startswith("Before.") and rendered.endswith("After.\n")
    with pytest.raises(hooks.TableMarkerError, match="page.md.*demo/other"):
        hooks.render_tables("<!-- table: demo/other -->\n", "page.md", tmp_path)
    filtered = hooks.render_tables(
        "<!-- table: demo/main model=resnet50 -->\n", "page.md", tmp_path
    )
    assert "| resnet50 | 1.5 |" in filtered
    with pytest.raises(hooks.TableMarkerError, match="no row of main"):
        hooks.render_tables("<!-- table: demo/main model=vgg -->\n", "page.md", tmp_path)
    with pytest.raises(hooks.TableMarkerError, match="nothing/main"):
        hooks.render_tables("<!-- table: nothing/main -->\n", "page.md", tmp_path)
    stale = "A.\n<!-- table: demo/main -->\n| old | table |\n<!-- /table -->\nB.\n"
    fresh = hooks.render_in_place(stale, "README.md", tmp_path)
    assert "| old |" not in fresh and "| resnet50 | 1.5 |" in fresh
    assert fresh.startswith("A.\n<!-- table: demo/main -->\n") and fresh.endswith("-->\nB.\n")
    assert hooks.render_in_place(fresh, "README.md", tmp_path) == fresh
    assert "| old |" not in hooks.render_tables(stale, "page.md", tmp_path)


def test_every_table_marker_names_a_committed_result() -> None:
    """What the build renders, checked marker by marker: every missing table is named at once
    (the build stops at the first)."""
    hooks = load_hooks()
    missing = []
    for page in pages():
        for marker in hooks.TABLE_MARKER.finditer(page.read_text()):
            try:
                hooks.render_tables(marker[0], str(page.relative_to(ROOT)))
            except hooks.TableMarkerError as error:
                missing.append(str(error))
    assert not missing, "\n".join(missing)


def test_every_code_block_names_its_language_and_not_run_says_why() -> None:
    for page in pages():
        for block in blocks(page):
            assert block.language, f"{block.where}: name the block's language (text for output)"
            if block.not_run is not None:
                assert len(block.not_run.split()) >= 2, f"{block.where}: say why it is not run"
            refused = unrunnable(block)
            assert not refused, (
                f"{block.where}: the tests run only {sorted(SHELL_COMMANDS)} in a bash block; "
                f"mark this one <!-- not run: reason --> (it runs {refused})"
            )


def test_a_same_as_block_is_run_by_the_page_it_names() -> None:
    """A `same as` page runs an identical block; a `same as` example holds every line."""
    for page in pages():
        for block in blocks(page):
            if block.same_as and block.same_as.startswith("examples/"):
                lines = {line.strip() for line in (ROOT / block.same_as).read_text().splitlines()}
                missing = [x for x in block.code.splitlines() if x.strip() not in lines]
                assert not missing, f"{block.where}: not in {block.same_as}: {missing}"
            elif block.same_as:
                there = [b for b in blocks(ROOT / block.same_as) if b.runner]
                assert any(b.code == block.code for b in there), (
                    f"{block.where}: {block.same_as} runs no block identical to this one"
                )


def test_a_not_run_marker_and_an_example_block_are_recognised(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "<!-- not run: installs packages -->\n```bash\npip install x\n```\n\n"
        "<!-- same as: docs/index.md -->\n```bash\nghostify --help\n```\n\n"
        "```python\n--8<--\nexamples/audit_report.py\n--8<--\n```\n\n"
        "- a list item:\n\n  ```python\n  x = 1\n  ```\n"
    )
    found = blocks(page)
    assert [(b.language, b.runner) for b in found] == [
        ("bash", None),
        ("bash", None),
        ("python", None),
        ("python", "python"),
    ]
    assert found[0].not_run == "installs packages" and found[1].same_as == "docs/index.md"
    unmarked = Block(page, 1, "bash", "ghostify --help \\\n  -q\n# a comment\npip install x\n")
    assert unrunnable(unmarked) == ["pip"]
    assert found[2].example == "examples/audit_report.py"
    assert found[3].code == "x = 1\n"


DOC_PAGES = [p for p in pages() if p.name != "README.md" and any(b.runner for b in blocks(p))]


@pytest.mark.parametrize("page", DOC_PAGES, ids=lambda p: str(p.relative_to(DOCS)))
def test_docs_page_code_runs(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # examples write their files to the working directory
    assert run_page(page, tmp_path) >= 1


def test_every_public_name_is_in_the_api_reference() -> None:
    """A name added to ghostify.__all__ gets its `::: ghostify.<name>` entry (the build then fails
    if the name is renamed or removed)."""
    import ghostify

    documented = set(re.findall(r"^::: ghostify\.(\w+)$", API_PAGE.read_text(), re.M))
    missing = sorted(set(ghostify.__all__) - documented - {"__version__"})
    assert not missing, f"add to docs/reference/api.md: {', '.join(missing)}"
