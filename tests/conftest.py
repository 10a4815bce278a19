"""Session-wide fixtures shared by tests/models, tests/training and tests/recipes.

``tiny_assets`` builds the generated tiny assets (tokenizer, tiny Llama-3 in HF + Meta layouts, tiny
open_clip hub folder, synthetic SLAKE-layout set) once, into a cache folder keyed by a content hash
of the generator modules and the set sizes. A file lock makes parallel xdist workers (and parallel
pytest runs) wait for one builder instead of building concurrently; later runs reuse the folder.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import pytest

import medtune.models.llama3 as _llama3_mod
import medtune.testing.assets as _assets_mod
import medtune.testing.synthetic as _synthetic_mod
import medtune.training.export as _export_mod

# Smaller than the demo's (384/96/96): enough for the small-scale demo-gap test, quick to write.
TINY_SIZES = {"n_train": 288, "n_val": 32, "n_test": 96, "seed": 0}

REPO_ROOT = Path(__file__).resolve().parents[1]

# Training runs in tests redraw no curves at their epoch ends (medtune.viz.curves.plot_run: about
# a CPU-second per redraw, most of a tiny run's time). Tests that check the figures set
# MEDTUNE_PLOTS=1 for their runs: tests/viz, tests/cli/test_plot.py, the vision_finetune CLI run,
# mavl_pretrain's demo run, contrastive_pretrain's resumed run.
os.environ.setdefault("MEDTUNE_PLOTS", "0")


def _assets_key() -> str:
    h = hashlib.sha256()
    for mod in (
        _assets_mod,
        _synthetic_mod,
        _llama3_mod,
        _export_mod,
    ):  # the tokenizer and HF layouts
        h.update(Path(mod.__file__).read_bytes())
    h.update(repr(sorted(TINY_SIZES.items())).encode())
    return h.hexdigest()[:16]


def build_cached_tiny_assets() -> Path:
    """Build (or reuse) the tiny assets under ``$MEDTUNE_TEST_ASSETS`` or ``/tmp/medtune-test-assets``."""
    from medtune.testing.assets import make_tiny_assets

    base = Path(
        os.environ.get("MEDTUNE_TEST_ASSETS", Path(tempfile.gettempdir()) / "medtune-test-assets")
    )
    base.mkdir(parents=True, exist_ok=True)
    out = base / _assets_key()
    with open(base / f"{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not (out / ".complete").exists():
                # a half-written folder from a killed build: start over (make_tiny_assets reuses
                # only a folder marked complete)
                if out.exists():
                    shutil.rmtree(out)
                tmp = base / f"{out.name}.building"
                if tmp.exists():
                    shutil.rmtree(tmp)
                make_tiny_assets(tmp, **TINY_SIZES)
                os.replace(tmp, out)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return out


@pytest.fixture(scope="session")
def tiny_assets() -> Path:
    """Root folder of the tiny assets (read-only: copy before damaging anything)."""
    return build_cached_tiny_assets()


def build_cached_tiny_towers() -> Path:
    """Build (or reuse) the dual-encoder assets (:mod:`medtune.testing.towers`), cached and
    flock'd like :func:`build_cached_tiny_assets`, keyed by that module's content."""
    import medtune.models.dual_encoder as _dual_mod
    import medtune.testing.towers as _towers_mod
    from medtune.testing.towers import make_tiny_towers

    h = hashlib.sha256()
    for mod in (_towers_mod, _dual_mod, _synthetic_mod):
        h.update(Path(mod.__file__).read_bytes())
    base = Path(
        os.environ.get("MEDTUNE_TEST_ASSETS", Path(tempfile.gettempdir()) / "medtune-test-assets")
    )
    base.mkdir(parents=True, exist_ok=True)
    out = base / f"towers-{h.hexdigest()[:16]}"
    with open(base / f"{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not (out / ".complete").exists():
                tmp = base / f"{out.name}.building"
                shutil.rmtree(out, ignore_errors=True)
                shutil.rmtree(tmp, ignore_errors=True)
                make_tiny_towers(tmp)
                os.replace(tmp, out)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return out


@pytest.fixture(scope="session")
def tiny_towers() -> Path:
    """Root of the tiny dual-encoder assets (read-only): tiny_bert/, tiny_biomedclip/,
    tiny_captions/, tiny_cxr14/, concepts.json."""
    return build_cached_tiny_towers()


@pytest.fixture(scope="module")
def one_thread():
    """On 2 shared cores torch's default thread pool oversubscribes the CPU: one thread for a
    module's runs, its module-scoped fixtures included. Recipe test files opt in with
    ``pytestmark = [..., pytest.mark.usefixtures("one_thread")]``."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def medtune_cli():
    """The ``medtune`` CLI in forked copies of one pre-imported process (one per xdist worker):
    ``medtune_cli.run("run", "vision_finetune", "--config", "demo", ..., cwd=..., env=...,
    nproc=2, kill_when=...)`` -> ``subprocess.CompletedProcess``. Each command costs what it
    does, not the 10-15 CPU-s of imports a fresh process pays (:mod:`medtune.testing.forkserver`).
    Tests of the CLI's own start-up (quiet start, torchrun launch) keep real subprocesses."""
    from medtune.testing.forkserver import ForkServer

    server = ForkServer(
        env=dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1", PYTHONUNBUFFERED="1")
    )
    yield server
    server.close()
