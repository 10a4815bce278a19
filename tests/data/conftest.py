"""Fixture folders for the data tests (built once per session; tests that edit copy them)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from medtune.testing.datasets import make_slake_fixture, make_vqa_rad_fixture


@pytest.fixture(scope="session")
def slake_dir(tmp_path_factory) -> Path:
    """A read-only miniature ``Slake1.0`` folder."""
    return make_slake_fixture(tmp_path_factory.mktemp("slake"))


@pytest.fixture(scope="session")
def vqa_rad_dir(tmp_path_factory) -> Path:
    """A read-only miniature OSF VQA-RAD folder."""
    return make_vqa_rad_fixture(tmp_path_factory.mktemp("vqa_rad"))


@pytest.fixture
def slake_copy(slake_dir, tmp_path) -> Path:
    """A private copy of the SLAKE fixture that a test may damage."""
    return Path(shutil.copytree(slake_dir, tmp_path / "Slake1.0"))


@pytest.fixture
def vqa_rad_copy(vqa_rad_dir, tmp_path) -> Path:
    """A private copy of the VQA-RAD fixture that a test may damage."""
    return Path(shutil.copytree(vqa_rad_dir, tmp_path / "VQA_RAD"))
