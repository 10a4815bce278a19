"""No import cycles between medtune's files, as tests/test_layering.py has no upward import.

Every ``import`` counts, also one inside a function: a cycle held together by a function-level
import still means two files that cannot be understood (or moved) apart. An edge goes from a file
to the most specific medtune module it names (``from medtune.data import errors`` -> the file
``medtune/data/errors.py``; ``from medtune.data import Sample`` -> ``medtune/data/__init__.py``).
A package's ``__init__`` importing its own submodules is an edge like any other; the implicit
import of a parent package when a submodule is imported is not.
"""

from __future__ import annotations

from pathlib import Path

import test_layering
from test_layering import PACKAGE, imports_of


def _module_name(path: Path, package: Path) -> str:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules(package: Path) -> dict[str, Path]:
    return {_module_name(p, package): p for p in sorted(package.rglob("*.py"))}


def _target(name: str, names: set[str], imported: list[str]) -> list[str]:
    """The medtune modules that ``from name import imported`` (or ``import name``) reaches."""
    out = []
    for item in imported or [None]:
        full = f"{name}.{item}" if item else name
        if full in names:  # from package import submodule
            out.append(full)
            continue
        parts = name.split(".")
        while parts and ".".join(parts) not in names:
            parts.pop()
        if parts:
            out.append(".".join(parts))
    return out


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """medtune module -> the medtune modules it imports (file level, function-level imports too)."""
    import ast

    mods = _modules(package)
    names = set(mods)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        lines = {line for line, _ in imports_of(path)}
        tree = ast.parse(path.read_text("utf-8"), str(path))
        by_line: dict[int, list[str]] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.lineno in lines:
                by_line.setdefault(node.lineno, []).extend(a.name for a in node.names)
        for line, target in imports_of(path):
            if not target.startswith("medtune"):
                continue
            for t in _target(target, names, by_line.get(line, [])):
                if t != mod:
                    graph[mod].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_the_checker_finds_a_cycle_through_a_function_level_import(tmp_path, monkeypatch):
    # The check itself must be able to fail: a fake package whose two files import each other,
    # one of them only inside a function, and a third file that is not part of the cycle.
    root = tmp_path / "medtune"
    (root / "data").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "data" / "__init__.py").write_text("from medtune.data.rows import Row\n")
    (root / "data" / "rows.py").write_text("from medtune.data import errors\nRow = 1\n")
    (root / "data" / "errors.py").write_text("def f():\n    from medtune.data.rows import Row\n")
    (root / "data" / "other.py").write_text("from medtune.data.errors import f\n")
    monkeypatch.setattr(test_layering, "PACKAGE", root)  # imports_of names modules under it
    graph = import_graph(root)
    assert graph["medtune.data.rows"] == {"medtune.data.errors"}
    assert graph["medtune.data"] == {"medtune.data.rows"}
    assert cycles(graph) == [["medtune.data.errors", "medtune.data.rows"]]
