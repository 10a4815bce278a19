"""Imports point down only: utils < models < data < training, eval, generation, inference <
serve, testing < _cli. Every ``import`` in every module counts, also those inside functions."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "medtune"

# The layer of each top-level part of medtune; a module may import its own layer and lower ones.
LEVELS = {
    "utils": 0,
    "models": 1,
    "data": 2,
    "training": 3,
    "eval": 3,
    "generation": 3,
    "inference": 3,
    "serve": 4,
    "viz": 4,  # figures and pages: read data (DICOM thumbnails) and eval (metrics)
    "testing": 4,  # builders of tiny test assets: use models and training's exporters
    "_cli": 5,
}


def _part(module: str) -> str | None:
    """``medtune.data.images`` -> ``data``; None for ``medtune`` itself and for other packages."""
    parts = module.split(".")
    return parts[1] if parts[0] == "medtune" and len(parts) > 1 else None


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) for every import in ``path``, relative imports resolved."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text("utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.append((node.lineno, target))
            # `from medtune import training` imports the subpackage
            if target == "medtune":
                out.extend((node.lineno, f"medtune.{a.name}") for a in node.names)
    return sorted(out)


def upward_imports() -> list[str]:
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        own = _part(_module_name(path))
        if own is None:
            continue  # medtune/__init__.py
        if own not in LEVELS:
            problems.append(f"{path}: medtune.{own} has no layer in tests/test_layering.py LEVELS")
            continue
        for line, target in imports_of(path):
            other = _part(target)
            if other is None or other == own:
                continue
            if other not in LEVELS:
                problems.append(f"{path}:{line}: imports unknown part {target}")
            elif LEVELS[other] > LEVELS[own]:
                problems.append(f"{path}:{line}: {own} imports {target} (a higher layer)")
    return problems


def test_no_upward_imports():
    assert upward_imports() == []


def test_the_checker_sees_upward_and_relative_imports(tmp_path, monkeypatch):
    # The check itself must be able to fail: a fake package with one upward import of each form.
    root = tmp_path / "medtune"
    for part in ("models", "training"):
        (root / part).mkdir(parents=True)
        (root / part / "__init__.py").write_text("")
    (root / "__init__.py").write_text("")
    (root / "models" / "a.py").write_text(
        "def f():\n    from medtune.training import x\n"
        "from ..training import y\nimport medtune.training.z\nfrom medtune import training\n"
    )
    (root / "training" / "b.py").write_text("from medtune.models import a\nfrom . import c\n")
    monkeypatch.setitem(globals(), "PACKAGE", root)
    found = upward_imports()
    assert [p.split(": ", 1)[1] for p in found] == [
        "models imports medtune.training (a higher layer)",
        "models imports medtune.training (a higher layer)",
        "models imports medtune.training.z (a higher layer)",
        "models imports medtune.training (a higher layer)",
    ]
    assert all(str(root / "models" / "a.py") in p for p in found)


@pytest.mark.parametrize("part", ["models", "data"])
def test_bottom_layers_do_not_import_training_eval_inference_serve(part):
    for path in sorted((PACKAGE / part).rglob("*.py")):
        for line, target in imports_of(path):
            assert _part(target) not in {"training", "eval", "inference", "serve", "_cli"}, (
                f"{path}:{line}: {target}"
            )
