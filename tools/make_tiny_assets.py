"""Build every tiny demo asset set (medtune.testing.demo_assets.DEMO_ASSETS) into assets/<name>.

    python tools/make_tiny_assets.py                    # what `make demo` runs: all of them
    python tools/make_tiny_assets.py --only tiny_towers # one set
    python tools/make_tiny_assets.py --root /tmp/assets # elsewhere (configs: assets_dir=...)

Each builder reuses a folder it marked complete (``.complete``), so a second run is instant;
delete the folder to rebuild it.
"""

import argparse
import sys
import time
from pathlib import Path

from medtune.testing.demo_assets import DEMO_ASSETS
from medtune.utils.errors import UserError, run_entry


def build(root: Path, names: list[str]) -> dict[str, Path]:
    """Build the named sets into ``root/<name>`` (in registry order).

    Returns:
        name -> the folder its builder returned.
    """
    built = {}
    for name in DEMO_ASSETS:
        if name not in names:
            continue
        t0 = time.perf_counter()
        built[name] = Path(DEMO_ASSETS[name](root / name))
        print(f"{name}: ready in {built[name]} ({time.perf_counter() - t0:.1f}s)", flush=True)
    return built


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--root", default="assets", type=Path, help="folder holding the sets")
    p.add_argument(
        "--only", nargs="+", metavar="NAME", help=f"build only these ({', '.join(DEMO_ASSETS)})"
    )
    args = p.parse_args()
    names = args.only or list(DEMO_ASSETS)
    unknown = [n for n in names if n not in DEMO_ASSETS]
    if unknown:
        raise UserError(
            f"--only: unknown asset set {', '.join(unknown)}; known: {', '.join(DEMO_ASSETS)}"
        )
    t0 = time.perf_counter()
    build(args.root, names)
    print(f"tiny assets ready in {args.root} ({time.perf_counter() - t0:.1f}s)")


if __name__ == "__main__":
    sys.exit(run_entry("make_tiny_assets", main))
