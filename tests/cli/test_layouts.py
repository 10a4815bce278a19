"""Recipes and configs are found in the editable checkout and in an installed wheel."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import LIGHT_RECIPE

import medtune

REPO = Path(medtune.__file__).resolve().parent.parent
PROBE_CONFIG = "# probe config\nout_file: probe.json\nvalue: 1\n"
SKIP_COPY = shutil.ignore_patterns(
    ".venv", ".git", "assets", "outputs", "runs", "dist", "build", "__pycache__", "*.pyc",
    ".pytest_cache", ".ruff_cache", "*.egg-info",
)  # fmt: skip


def _python(code: str, *args: str, cwd: Path, pythonpath: str | None = None):
    env = {k: v for k, v in os.environ.items() if k not in ("MEDTUNE_RECIPES_DIR", "PYTHONPATH")}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


CLI = "import sys; from medtune._cli.main import main; sys.exit(main())"
WHERE = (
    "import medtune; from medtune._cli import registry; "
    "print(medtune.__file__); print(registry.recipes_root())"
)


def test_editable_checkout_uses_repo_recipes(tmp_path):
    assert not (REPO / "medtune" / "_recipes").exists(), "checkout must not hold medtune/_recipes"
    proc = _python(WHERE, cwd=tmp_path)  # outside the repo
    assert proc.returncode == 0, proc.stderr
    module_file, root = proc.stdout.split()
    assert Path(module_file) == REPO / "medtune" / "__init__.py"
    assert Path(root) == REPO / "recipes"
    proc = _python(CLI, "ls", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    recipes_table, _, aliases_table = proc.stdout.partition("\n\n")  # recipes, then aliases
    listed = {
        line.split()[0] for line in recipes_table.splitlines()[1:] if not line.startswith(" ")
    }
    on_disk = {p.stem for p in (REPO / "recipes").glob("*.py") if not p.name.startswith("_")}
    assert listed == on_disk
    aliases = {line.split()[0]: line.split()[1] for line in aliases_table.splitlines()[1:]}
    assert set(aliases.values()) <= on_disk and not set(aliases) & on_disk


@pytest.fixture(scope="module")
def wheel_site(tmp_path_factory) -> Path:
    """Build medtune's wheel from a copy of the checkout (plus a probe recipe); install it."""
    base = tmp_path_factory.mktemp("wheel")
    src = base / "src"
    shutil.copytree(REPO, src, ignore=SKIP_COPY)
    (src / "recipes" / "wheelprobe.py").write_text(LIGHT_RECIPE)
    (src / "recipes" / "configs" / "wheelprobe").mkdir(parents=True)
    (src / "recipes" / "configs" / "wheelprobe" / "probe.yaml").write_text(PROBE_CONFIG)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    build = [
        *pip,
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-w",
        str(base / "dist"),
        f"{src}/",
    ]
    proc = subprocess.run(build, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (wheel,) = (base / "dist").glob("medtune-*.whl")
    site = base / "site"
    install = [*pip, "install", "--no-deps", "--target", str(site), str(wheel)]
    proc = subprocess.run(install, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return site


def test_wheel_ships_recipes_as_package_data(wheel_site):
    assert (wheel_site / "medtune" / "_recipes" / "wheelprobe.py").is_file()
    assert (wheel_site / "medtune" / "_recipes" / "configs" / "wheelprobe" / "probe.yaml").is_file()
    # never a top-level `recipes` package (torchtune installs one)
    assert not (wheel_site / "recipes").exists()


def test_wheel_layout_ls_cat_cp_run(wheel_site, tmp_path):
    site = str(wheel_site)
    proc = _python(WHERE, cwd=tmp_path, pythonpath=site)
    assert proc.returncode == 0, proc.stderr
    module_file, root = proc.stdout.split()
    assert Path(module_file) == wheel_site / "medtune" / "__init__.py"
    assert Path(root) == wheel_site / "medtune" / "_recipes"

    proc = _python(CLI, "ls", cwd=tmp_path, pythonpath=site)
    assert proc.returncode == 0, proc.stderr
    assert "wheelprobe" in proc.stdout and "wheelprobe/probe" in proc.stdout
    on_disk = {p.stem for p in (REPO / "recipes").glob("*.py") if not p.name.startswith("_")}
    for name in on_disk:  # the checkout's real recipes ship too
        assert name in proc.stdout

    proc = _python(CLI, "cat", "wheelprobe/probe", cwd=tmp_path, pythonpath=site)
    assert proc.returncode == 0 and proc.stdout == PROBE_CONFIG

    proc = _python(CLI, "cp", "wheelprobe/probe", "mine.yaml", cwd=tmp_path, pythonpath=site)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "mine.yaml").read_text() == PROBE_CONFIG

    proc = _python(CLI, "run", "wheelprobe", "--config", "probe", "value=5", cwd=tmp_path,
                   pythonpath=site)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "probe.json").read_text())["value"] == 5
