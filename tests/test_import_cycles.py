"""No import cycle inside ``ghostify``: every import between its modules, read from the source.

The rule enforced: module A depends on module B when A's source imports B anywhere: at module
level, inside a function, or under ``if TYPE_CHECKING`` (a cycle there is still two modules that
each need the other). ``from package import name`` depends on ``package.name`` when that is a
module, else on the package itself; a module does not depend on its parent packages just by
living in them (Python runs a package's ``__init__`` first, but that is the package's choice of
what to re-export, not the module's). The test fails on any cycle and names its modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

import ghostify

ROOT = Path(ghostify.__file__).resolve().parent

# Known upward calls, each with the work that removes it; the test fails on any other cycle.
ALLOWED = {
    ("ghostify.layers.ghost_module", "ghostify.fit"): "GhostModule.from_conv(init='weights') "
    "fits itself by calling up into ghostify.fit (issue 26.6: ghost_module.py split by concept)",
}


def module_names() -> dict[str, Path]:
    """Every module of the package: dotted name -> source file."""
    names = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package's modules that ``name`` (defined in ``path``) imports anywhere."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                for alias in node.names
            ]
        else:
            continue
        found.update(target for target in targets if target in known and target != name)
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def test_the_rule_sees_every_kind_of_import(tmp_path) -> None:
    """The parser finds module-level, function-level, relative and TYPE_CHECKING imports."""
    known = {"pkg": tmp_path, "pkg.a": tmp_path, "pkg.b": tmp_path, "pkg.c": tmp_path}
    source = tmp_path / "a.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "from . import b\n"
        "if TYPE_CHECKING:\n"
        "    from .c import Thing\n"
        "def later():\n"
        "    import pkg\n"
    )
    assert imports_of("pkg.a", source, known) == {"pkg", "pkg.b", "pkg.c"}
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_inside_ghostify() -> None:
    known = module_names()
    graph = {name: imports_of(name, path, known) for name, path in known.items()}
    for (source, target), _why in ALLOWED.items():
        assert target in graph[source], f"{source} no longer imports {target}: drop it from ALLOWED"
        graph[source].discard(target)
    assert len(graph) > 50  # the whole package was read
    found = cycles(graph)
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)
