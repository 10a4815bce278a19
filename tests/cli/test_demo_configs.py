"""Every ``<recipe>/demo*`` config runs right after ``make demo``: each path it names exists once
the demo asset sets are built, and each checkpoint it reads is the one ``make demo`` trains.

The configs are found through the registry (what ``medtune ls`` lists), so a recipe added later
is covered without touching this file. The asset sets are those of
:data:`medtune.testing.demo_assets.DEMO_ASSETS` (what ``tools/make_tiny_assets.py`` builds),
built into a cache laid out as ``assets/`` is: ``tiny`` and ``tiny_towers`` are the session
caches of tests/conftest.py (the same builders; ``tiny`` with fewer rows), every other set is
built by its registry builder. A missing demo path makes ``medtune run`` name ``make demo``.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import tempfile
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from medtune._cli import registry
from medtune._cli.main import main
from medtune._cli.needs import check_needed_paths
from medtune.testing.demo_assets import DEMO_ASSETS, DEMO_CHECKPOINT, DEMO_OUTPUT

REPO = Path(__file__).resolve().parents[2]
TESTING = REPO / "medtune" / "testing"


def demo_configs() -> list[registry.Config]:
    """Every registered config whose name starts with ``demo`` (``vision_finetune/demo``,
    ``zero_shot_classify/demo_retrieval``, ``.../sub/demo_x``)."""
    old = os.environ.pop(registry.ENV_VAR, None)
    try:
        return [
            c
            for r in registry.list_recipes()
            for c in r.configs
            if Path(c.name).name.startswith("demo")
        ]
    finally:
        if old is not None:
            os.environ[registry.ENV_VAR] = old


DEMOS = demo_configs()


@pytest.fixture(scope="module")
def demo_assets_root(tiny_assets, tiny_towers) -> Path:
    """A folder laid out as ``make demo``'s ``assets/``: ``<root>/<name>`` for every set."""
    h = hashlib.sha256()
    for path in sorted(TESTING.rglob("*.py")):
        h.update(path.read_bytes())
    base = Path(
        os.environ.get("MEDTUNE_TEST_ASSETS", Path(tempfile.gettempdir()) / "medtune-test-assets")
    )
    root = base / f"demo-{h.hexdigest()[:16]}"
    root.mkdir(parents=True, exist_ok=True)
    cached = {"tiny": tiny_assets, "tiny_towers": tiny_towers}
    with open(base / f"{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            for name, build in DEMO_ASSETS.items():  # registry order: a set may read an earlier one
                target = root / name
                if name in cached:
                    if target.is_symlink() or target.exists():
                        target.unlink()
                    target.symlink_to(cached[name], target_is_directory=True)
                else:
                    build(target)  # reuses a folder it marked complete
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return root


def named_paths(cfg: registry.Config) -> tuple[str | None, list[tuple[str, str]]]:
    """(output_dir, [(key, path)]) for every string of the resolved config that is a path:
    starting with ``assets/``, ``outputs/``, ``./``, ``../`` or ``/``."""
    data = OmegaConf.to_container(OmegaConf.load(cfg.path), resolve=True)
    found = []

    def walk(node, key):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{key}.{k}" if key else str(k))
        elif isinstance(node, list):
            for v in node:
                walk(v, key)
        elif isinstance(node, str) and node.startswith(("assets/", "outputs/", "./", "../", "/")):
            found.append((key, node))

    walk(data, "")
    return data.get("output_dir"), found


def _within(path: str, folder: str | None) -> bool:
    return folder is not None and Path(path).parts[: len(Path(folder).parts)] == Path(folder).parts


def test_the_registry_lists_the_demo_configs():
    names = {c.full_name for c in DEMOS}
    # the ones this file was written against; later recipes add theirs
    assert {
        "vision_finetune/demo",
        "eval/demo",
        "generate/demo",
        "serve/demo",
        "contrastive_pretrain/demo",
        "qformer_pretrain/demo",
        "zero_shot_classify/demo",
        "zero_shot_classify/demo_retrieval",
    } <= names


def test_demo_checkpoint_is_what_run_demo_trains():
    """tools/run_demo.py trains ``vision_finetune/demo`` into DEMO_OUTPUT/image: its last epoch
    folder is DEMO_CHECKPOINT (run_demo also refuses to finish if it is not)."""
    epochs = yaml.safe_load((REPO / "recipes/configs/vision_finetune/demo.yaml").read_text())[
        "epochs"
    ]
    assert DEMO_OUTPUT / "image" / f"epoch_{epochs - 1}" == DEMO_CHECKPOINT
    source = (REPO / "tools" / "run_demo.py").read_text()
    assert (
        "default=DEMO_OUTPUT" in source
        and '"vision_finetune",\n            "--config",\n            "demo"' in source
    )
    assert (REPO / "Makefile").read_text().count("tools/make_tiny_assets.py --root $(ASSETS)") == 1


@pytest.mark.parametrize("cfg", DEMOS, ids=[c.full_name for c in DEMOS])
def test_every_path_a_demo_config_names_exists_after_the_asset_build(cfg, demo_assets_root):
    output_dir, paths = named_paths(cfg)
    assert output_dir and output_dir.startswith("outputs/"), f"{cfg.full_name}: output_dir"
    for key, value in paths:
        where = f"{cfg.full_name}: {key}={value}"
        if _within(value, output_dir):
            continue  # written by the run itself
        parts = Path(value).parts
        if parts[0] == "assets":
            assert len(parts) >= 2 and parts[1] in DEMO_ASSETS, (
                f"{where}: not under a set of medtune.testing.demo_assets.DEMO_ASSETS"
            )
            assert (demo_assets_root.joinpath(*parts[1:])).exists(), (
                f"{where}: missing after building DEMO_ASSETS[{parts[1]!r}]"
            )
        elif parts[0] == "outputs":
            assert Path(value) == DEMO_CHECKPOINT, (
                f"{where}: a demo may read only the checkpoint `make demo` trains ({DEMO_CHECKPOINT})"
            )
        else:
            pytest.fail(f"{where}: a demo config names a path outside assets/ and outputs/")


def test_demo_configs_pass_the_cli_check_in_a_made_demo_folder(
    demo_assets_root, tmp_path, monkeypatch
):
    """In a folder where ``make demo`` ran (assets/<set> and the demo checkpoint), the CLI's
    pre-flight check lets every demo config through."""
    monkeypatch.delenv(registry.ENV_VAR, raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "assets").mkdir()
    for name in DEMO_ASSETS:
        (tmp_path / "assets" / name).symlink_to(demo_assets_root / name)
    (tmp_path / DEMO_CHECKPOINT).mkdir(parents=True)
    for cfg in DEMOS:
        check_needed_paths(cfg.path, [])


def _run(capsys, *argv: str) -> tuple[int, str]:
    try:
        status = main(list(argv))
    except SystemExit as e:
        status = e.code
    return int(status or 0), capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, missing, command",
    [
        (["eval", "--config", "demo"], "assets/tiny", "make demo"),
        (["zero_shot_classify", "--config", "demo_retrieval"], "assets/tiny_towers", "make demo"),
        (
            ["generate", "--config", "demo", "assets_dir=ASSETS"],
            str(DEMO_CHECKPOINT),
            "make demo",
        ),
        (
            [
                "eval",
                "--config",
                "demo",
                "assets_dir=ASSETS",
                "checkpoints=[outputs/vision_finetune_slake/epoch_2]",
            ],
            "outputs/vision_finetune_slake/epoch_2",
            "medtune run vision_finetune --config slake",
        ),
    ],
)
def test_missing_demo_input_names_the_command_that_makes_it(
    argv, missing, command, tiny_assets, tmp_path, monkeypatch, capsys
):
    monkeypatch.delenv(registry.ENV_VAR, raising=False)
    monkeypatch.chdir(tmp_path)
    argv = [a.replace("ASSETS", str(tiny_assets)) for a in argv]
    status, err = _run(capsys, "run", *argv)
    assert status == 1, err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert f"{missing} does not exist; `{command}` writes it" in lines[0], err
