"""Every tiny asset set that a shipped ``demo*`` config names, in one registry.

``tools/make_tiny_assets.py`` (what ``make demo`` runs) builds each entry into ``assets/<name>``;
the test fixtures build the same builders into a cache. A recipe that ships a demo config needing
generated files adds one line here: the folder name under ``assets/`` and a builder
``fn(out_dir) -> Path`` that writes the set (reusing a folder it marked complete).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path


def _tiny(out: Path) -> Path:
    from medtune.testing.assets import make_tiny_assets

    return make_tiny_assets(out).root


def _towers(out: Path) -> Path:
    from medtune.testing.towers import make_tiny_towers

    return make_tiny_towers(out)


# folder under assets/ -> builder. Order matters only for builders that read another set.
DEMO_ASSETS: dict[str, Callable[[Path], Path]] = {
    "tiny": _tiny,
    "tiny_towers": _towers,
}
