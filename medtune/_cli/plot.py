"""``medtune plot RUN_DIR [RUN_DIR ...] [--out DIR]``: training curves of one or several runs.

Reads each run's torchtune ``DiskLogger`` logs (``RUN_DIR/logs/*.txt``; a killed and resumed run's
files are merged, each step once) and draws loss (train, validation), learning rate per parameter
group, grad norm, throughput and the other logged metrics against step, every run on shared axes
(:func:`medtune.viz.curves.plot_runs`). Default ``--out``: ``RUN_DIR/plots`` for one run, else
``plots/`` in the current folder.
"""

from __future__ import annotations

import argparse
from pathlib import Path

EPILOG = """\
examples:
  $ medtune plot outputs/demo/image                         # -> outputs/demo/image/plots/*.png
  $ medtune plot outputs/demo/image outputs/demo/blank --out outputs/demo/plots
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``plot`` subcommand.

    Args:
        subparsers: the object returned by ``ArgumentParser.add_subparsers()``.
    """
    parser = subparsers.add_parser(
        "plot",
        help="draw training curves (PNG) from runs' metric logs",
        description="Draw the training curves of one or several runs on shared axes.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="a training output_dir")
    parser.add_argument(
        "--out", metavar="DIR", help="where the PNGs go (default RUN_DIR/plots, or ./plots)"
    )
    parser.add_argument(
        "--name", action="append", metavar="LABEL", help="legend label per run, in order"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Draw the curves; print one line per PNG written.

    Returns:
        0; a run without logs is a ``UserError`` (one ``medtune: error:`` line).
    """
    from medtune.utils.errors import UserError
    from medtune.viz.curves import plot_runs

    if args.name and len(args.name) != len(args.runs):
        raise UserError(f"--name given {len(args.name)} time(s) for {len(args.runs)} run(s)")
    for r in args.runs:
        if not Path(r).is_dir():
            raise UserError(f"run folder not found: {r}")
    out = args.out or (Path(args.runs[0]) / "plots" if len(args.runs) == 1 else Path("plots"))
    for path in plot_runs(args.runs, out, names=args.name):
        print(path)
    return 0
