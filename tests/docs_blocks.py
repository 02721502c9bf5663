"""The code blocks of README.md and docs/**/*.md, and how the tests run them.

Every fenced block names its language. ``python`` blocks run (``exec``), and ``bash`` blocks run
in ``bash -e``: the blocks of one page in order, in one namespace and one temporary folder, so a
later block may use what an earlier one made. A block that must not run (an install, a sweep
of hours) is marked on the line just before its fence with ``<!-- not run: <reason> -->``. A
block that is only a snippet (``--8<--``, ``examples/<file>``, ``--8<--``) shows an example,
which tests/test_examples.py runs. A block marked ``<!-- same as: docs/<page>.md -->`` is run
where that page holds the very same block, and one marked ``<!-- same as: examples/<file> -->``
holds lines of that example (README repeats them; they need not run twice). Other languages
(``text``, ``json``, ...) are output or data and are not run.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
RUN_LANGUAGES = {"python": "python", "py": "python", "bash": "bash", "sh": "bash"}
NOT_RUN = re.compile(r"^\s*<!-- not run: (.+?) -->\s*$")
# What an unmarked bash block may run: the ghostify command and a few read-only tools. Anything
# else (an install, a benchmark) must be marked `<!-- not run: ... -->`; the tests never run it.
SHELL_COMMANDS = {"ghostify", "cmp", "diff", "ls", "cat", "test", "echo"}
SAME_AS = re.compile(r"^\s*<!-- same as: (\S+) -->\s*$")
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
# pymdownx.snippets' block form (its one-line form `--8<-- "path"` parses as Python, and ruff's
# Markdown formatting would rewrite it)
SNIPPET = re.compile(r"^--8<--\n(?P<path>[^\n]+)\n--8<--$")


@dataclass
class Block:
    """One fenced code block of a page."""

    page: Path
    line: int  # 1-based line of the opening fence
    language: str  # "" when the fence names none
    code: str
    not_run: str | None = None  # the reason given on the line before the fence
    same_as: str | None = None  # a page (from the root) holding and running this very block, or
    # an examples/ file whose lines include every line of it

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    @property
    def example(self) -> str | None:
        """The examples/ file this block only shows, if that is all it does."""
        match = SNIPPET.match(self.code.strip())
        if match and match["path"].startswith("examples/"):
            return match["path"]
        return None

    @property
    def runner(self) -> str | None:
        """ "python" or "bash" for a block the tests run, else None."""
        if self.not_run or self.example or self.same_as:
            return None
        return RUN_LANGUAGES.get(self.language)


def shell_commands(code: str) -> list[str]:
    """The command names of a bash block's lines (continuations joined, comments skipped)."""
    lines = code.replace("\\\n", " ").splitlines()
    return [line.split()[0] for line in lines if line.strip() and not line.lstrip().startswith("#")]


def unrunnable(block: Block) -> list[str]:
    """The commands of an unmarked bash block that the tests will not run."""
    if block.runner != "bash":
        return []
    return [name for name in shell_commands(block.code) if name not in SHELL_COMMANDS]


def pages() -> list[Path]:
    """README.md and every Markdown page of the site (not the MkDocs config folder)."""
    found = sorted(p for p in DOCS.rglob("*.md") if "mkdocs" not in p.relative_to(DOCS).parts)
    return [ROOT / "README.md", *found]


def blocks(page: Path) -> list[Block]:
    """The fenced code blocks of ``page``, in order."""
    lines = page.read_text().splitlines()
    found: list[Block] = []
    index = 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if not opening:
            index += 1
            continue
        indent, fence = opening["indent"], opening["fence"]
        language = opening["info"].strip().split(" ")[0].strip("{}.").lower()
        before = NOT_RUN.match(lines[index - 1]) if index else None
        same = SAME_AS.match(lines[index - 1]) if index else None
        body: list[str] = []
        index += 1
        while index < len(lines) and not lines[index].strip().startswith(fence):
            body.append(lines[index][len(indent) :] if lines[index].startswith(indent) else "")
            index += 1
        start = index - len(body)  # the opening fence's 1-based line number
        code = textwrap.dedent("\n".join(body)) + "\n"
        found.append(Block(page, start, language, code, before and before[1], same and same[1]))
        index += 1
    return found


def expand_snippets(code: str) -> str:
    """Inline ``--8<--`` blocks as MkDocs' snippets extension does (paths from the root)."""
    return re.sub(
        r"^--8<--\n([^\n]+)\n--8<--$", lambda m: (ROOT / m[1]).read_text(), code, flags=re.M
    )


def load_hooks() -> ModuleType:
    """docs/mkdocs/hooks.py, the MkDocs hook that renders benchmark tables."""
    spec = importlib.util.spec_from_file_location("docs_hooks", DOCS / "mkdocs" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def environment() -> dict[str, str]:
    """The environment a shell block or example runs in: this tree's ghostify first."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.setdefault("MPLBACKEND", "Agg")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def run_page(page: Path, folder: Path) -> int:
    """Run ``page``'s blocks in order in ``folder``; return how many ran."""
    namespace: dict[str, object] = {"__name__": "__docs__"}
    ran = 0
    for block in blocks(page):
        if block.runner == "python":
            code = compile(expand_snippets(block.code), block.where, "exec")
            exec(code, namespace)
        elif block.runner == "bash":
            refused = unrunnable(block)
            assert not refused, f"{block.where}: mark it <!-- not run: reason --> ({refused})"
            done = subprocess.run(
                ["bash", "-e", "-o", "pipefail", "-c", expand_snippets(block.code)],
                cwd=folder,
                env=environment(),
                capture_output=True,
                text=True,
                timeout=600,
            )
            output = f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
            assert done.returncode == 0, f"{block.where}: exit {done.returncode}\n{output}"
        else:
            continue
        ran += 1
    return ran
