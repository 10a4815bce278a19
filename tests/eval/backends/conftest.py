"""Fixtures of the backend tests: the benchmark fixtures, the tiny HF VLM folders (built once and
cached like the tiny assets) and an assets folder that the ``eval/demo_backends`` config reads."""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import pytest

import medtune.testing.hf_vlms as hf_vlms_mod
from medtune.testing.benchmarks import make_benchmark_fixtures


def build_cached_hf_vlms() -> Path:
    """``make_tiny_hf_vlms`` into ``$MEDTUNE_TEST_ASSETS`` (default /tmp/medtune-test-assets),
    keyed by the builder's source, built once under a file lock."""
    base = Path(
        os.environ.get("MEDTUNE_TEST_ASSETS", Path(tempfile.gettempdir()) / "medtune-test-assets")
    )
    base.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(Path(hf_vlms_mod.__file__).read_bytes()).hexdigest()[:16]
    out = base / f"hf_vlms-{key}"
    with open(base / f"{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not (out / ".complete").exists():
                tmp = base / f"{out.name}.building"
                shutil.rmtree(tmp, ignore_errors=True)
                hf_vlms_mod.make_tiny_hf_vlms(tmp)
                (tmp / ".complete").write_text("ok\n")
                shutil.rmtree(out, ignore_errors=True)
                os.replace(tmp, out)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return out


@pytest.fixture(scope="session")
def hf_vlms() -> Path:
    return build_cached_hf_vlms()


@pytest.fixture(scope="session")
def demo_assets(hf_vlms, tmp_path_factory) -> Path:
    """``assets/`` as ``make demo`` lays it out for ``eval/demo_backends``: ``benchmarks/`` and
    ``tiny_hf_vlms/``."""
    root = tmp_path_factory.mktemp("assets")
    make_benchmark_fixtures(root / "benchmarks")
    (root / "tiny_hf_vlms").symlink_to(hf_vlms)
    return root
