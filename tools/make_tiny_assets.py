"""Write the tiny test/demo assets (tokenizer, Llama-3 in HF + Meta layouts, open_clip dir, VQA set).

python tools/make_tiny_assets.py --out assets/tiny
"""

import argparse
import sys
import time

from medtune.testing.assets import make_tiny_assets
from medtune.utils.errors import run_entry


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default="assets/tiny", help="folder to write (reused when complete)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    t0 = time.perf_counter()
    assets = make_tiny_assets(args.out, seed=args.seed)
    print(f"tiny assets ready in {assets.root} ({time.perf_counter() - t0:.1f}s)")


if __name__ == "__main__":
    sys.exit(run_entry("make_tiny_assets", main))
