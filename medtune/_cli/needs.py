"""Before a recipe starts: a config path that another command writes, and that is missing, is
named together with that command.

``medtune run eval --config demo`` on a fresh clone would otherwise stop deep inside the recipe
("checkpoint folder not found: outputs/demo/image/epoch_5"); instead it stops at once with::

    medtune: error: checkpoints: outputs/demo/image/epoch_5 does not exist; `make demo` writes it

Known makers (:func:`maker_of`):

- ``assets/<name>/...`` for every set in :data:`medtune.testing.demo_assets.DEMO_ASSETS` and
  anything under the demo's output folder (``outputs/demo/``): ``make demo``;
- ``<output_dir>/...`` of a registered config (``outputs/vision_finetune_slake/epoch_2``):
  ``medtune run <recipe> --config <config>``.

Paths under the run's own ``output_dir`` and values of keys called ``output*`` are what the run
writes, and are never checked. A path with no known maker is left to the recipe's own checks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import registry
from ._errors import CLIError


def _leaves(node: Any, prefix: str = ""):
    """(dotted key, value) for every leaf of a plain container."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(node, list):
        for v in node:
            yield from _leaves(v, prefix)  # lists are named by their key (checkpoints: [...])
    else:
        yield prefix, node


def _within(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
    except ValueError:
        return False
    return True


def _output_dir(cfg_path: Path) -> str | None:
    """A config's ``output_dir`` as written (None when absent or interpolated)."""
    import yaml

    try:
        data = yaml.safe_load(cfg_path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    value = data.get("output_dir") if isinstance(data, dict) else None
    return value if isinstance(value, str) and "${" not in value else None


def maker_of(path: str | Path) -> str | None:
    """The command that writes ``path`` (see the module docstring), or None."""
    from medtune.testing.demo_assets import maker_of as demo_maker

    if (cmd := demo_maker(path)) is not None:
        return cmd
    path = Path(path)
    if path.is_absolute() or not path.parts or path.parts[0] != "outputs":
        return None
    for recipe in registry.list_recipes():
        for cfg in recipe.configs:
            out = _output_dir(cfg.path)
            if out and Path(out).parts[0] == "outputs" and _within(path, Path(out)):
                return f"medtune run {recipe.name} --config {cfg.name}"
    return None


def check_needed_paths(cfg_path: Path, overrides: list[str]) -> None:
    """Refuse, naming the command that makes it, the first missing path a config reads.

    Args:
        cfg_path: the YAML file.
        overrides: the checked overrides (``key=value``, ``~key``) as the recipe will get them.

    Raises:
        CLIError: ``<key>: <path> does not exist; `<command>` writes it``.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from .validate import load_config

    try:
        cfg = load_config(cfg_path)
        dotlist = [t for t in overrides if not t.startswith("~")]
        if dotlist:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(dotlist))
        data = OmegaConf.to_container(cfg, resolve=True)
    except (OmegaConfBaseException, ValueError, TypeError):
        return  # the recipe reports a broken config itself
    if not isinstance(data, dict):
        return
    own = data.get("output_dir")
    for key, value in _leaves(data):
        if not isinstance(value, str) or not value or "\n" in value or "://" in value:
            continue
        if key.rpartition(".")[2].startswith("output"):
            continue
        path = Path(value)
        if path.exists() or (isinstance(own, str) and own and _within(path, Path(own))):
            continue
        cmd = maker_of(path)
        if cmd is not None:
            raise CLIError(f"{key}: {value} does not exist; `{cmd}` writes it")
