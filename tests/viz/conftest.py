"""tests/viz draws figures: curves are on here (tests/conftest.py turns them off for the rest)."""

import pytest


@pytest.fixture(autouse=True)
def _plots_on(monkeypatch):
    monkeypatch.setenv("MEDTUNE_PLOTS", "1")
