"""Every tiny asset set that a shipped ``demo*`` config names, in one registry.

``tools/make_tiny_assets.py`` (what ``make demo`` runs) builds each entry into ``assets/<name>``;
the test fixtures build the same builders into a cache. A recipe that ships a demo config needing
generated files adds one line here: the folder name under ``assets/`` and a builder
``fn(out_dir) -> Path`` that writes the set (reusing a folder it marked complete).

``make demo`` then trains the demo (``tools/run_demo.py``) into :data:`DEMO_OUTPUT`; the demo
configs of ``eval``, ``generate`` and ``serve`` read its checkpoint :data:`DEMO_CHECKPOINT`.
:func:`maker_of` names the command that writes a missing ``assets/...`` or demo-checkpoint path
(``medtune run`` says it when a config names such a path that does not exist).
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module
from pathlib import Path


def _tiny(out: Path) -> Path:
    from medtune.testing.assets import make_tiny_assets

    return make_tiny_assets(out).root


def _towers(out: Path) -> Path:
    from medtune.testing.towers import make_tiny_towers

    return make_tiny_towers(out)


def _mavl(out: Path) -> Path:
    from medtune.testing.mavl import make_tiny_mavl

    return make_tiny_mavl(out)


def _llms(out: Path) -> Path:
    from medtune.testing.llm_families import make_tiny_llms

    return make_tiny_llms(out)


# folder under assets/ -> builder. Order matters only for builders that read another set.
DEMO_ASSETS: dict[str, Callable[[Path], Path]] = {
    "tiny": _tiny,
    "tiny_towers": _towers,
    "tiny_blip": lambda o: import_module("medtune.testing.blip").make_tiny_blip(o),
    "tiny_llms": _llms,
    "tiny_mavl": _mavl,
    "benchmarks": lambda o: import_module("medtune.testing.benchmarks").make_benchmark_fixtures(o),
    "tiny_hf_vlms": lambda o: import_module("medtune.testing.hf_vlms").make_tiny_hf_vlms(o),
}

# Where ``make demo`` (tools/run_demo.py) trains: <DEMO_OUTPUT>/image (images) and /blank (baseline).
DEMO_OUTPUT = Path("outputs/demo")
# The last checkpoint of the image run (vision_finetune/demo has epochs: 6 -> epoch_5); the
# eval / generate / serve demo configs point at it, and run_demo checks that it wrote it.
DEMO_CHECKPOINT = DEMO_OUTPUT / "image" / "epoch_5"
MAKE_DEMO = "make demo"


def maker_of(path: str | Path) -> str | None:
    """The command that writes ``path`` when it is a demo asset or the demo's output.

    Args:
        path: a path as a config names it (relative to the working directory, as the demo
            configs' ``assets/...`` and ``outputs/demo/...`` are).

    Returns:
        ``"make demo"`` for ``assets/<name>/...`` with ``<name>`` in :data:`DEMO_ASSETS` and for
        anything under :data:`DEMO_OUTPUT`; None otherwise.
    """
    parts = Path(path).parts
    if len(parts) >= 2 and parts[0] == "assets" and parts[1] in DEMO_ASSETS:
        return MAKE_DEMO
    if parts[: len(DEMO_OUTPUT.parts)] == DEMO_OUTPUT.parts:
        return MAKE_DEMO
    return None
