"""The process torchrun starts for each rank: ``python -m medtune._cli.launch RECIPE.py ARGS``.

Importing :mod:`medtune` first installs its import-noise filter (:mod:`medtune.utils.quiet`) before
the recipe imports torchtune and torchao, so every rank starts as quietly as ``medtune run``
in one process; then the recipe runs as ``python RECIPE.py ARGS`` would run it.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import medtune  # noqa: F401  - installs the quiet filter before the recipe's imports


def main() -> None:
    script = Path(sys.argv[1])
    sys.argv = [str(script), *sys.argv[2:]]
    sys.path.insert(0, str(script.parent))  # as `python script.py` puts the script's folder first
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main()
