"""Fixtures for the CLI tests: a fake recipes root (via ``$MEDTUNE_RECIPES_DIR``), a work dir."""

from __future__ import annotations

from pathlib import Path

import pytest
from cli_helpers import build_recipes_root


@pytest.fixture
def recipes_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake recipes root that the registry uses through ``$MEDTUNE_RECIPES_DIR``."""
    root = build_recipes_root(tmp_path / "recipes_root")
    monkeypatch.setenv("MEDTUNE_RECIPES_DIR", str(root))
    return root


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty current directory for the test."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work
