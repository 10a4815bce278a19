"""``medtune``: the command line entry point.

Run as the ``medtune`` console script or ``python -m medtune._cli.main``. Each subcommand lives in
its own module exposing ``register(subparsers)``; its handler returns an exit status (or None for
0) and raises :class:`~medtune._cli._errors.CLIError` (a ``UserError``) for problems a user can
fix. Handlers run under :func:`medtune.utils.errors.run_entry`, the policy of every recipe and
tool: user errors (and the library errors that stand for one) are one ``medtune: error: ...``
line on stderr (exit status 1), never a traceback; Ctrl-C exits 130; a closed stdout exits quietly.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from medtune.utils.errors import run_entry

from . import cat, cp, ls, run, score, validate

EPILOG = """\
examples:
  $ medtune ls                                      # recipes and their configs
  $ medtune cp vision_finetune/demo my_demo.yaml    # copy a config (or a recipe) to edit it
  $ medtune cat vision_finetune/demo                # print a config
  $ medtune validate my_demo.yaml                   # check every _component_ imports and binds
  $ medtune run vision_finetune --config demo optimizer.lr=1e-4
  $ medtune run --nproc_per_node 2 vision_finetune --config demo
  $ medtune plot outputs/demo/image outputs/demo/blank      # training curves on shared axes
  $ medtune export hf outputs/demo_llava/epoch_1 exported/  # a transformers LLaVA folder

Run `medtune <command> --help` for each command's options.
"""


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose usage errors end with a ``medtune: error: ...`` line."""

    def error(self, message: str):
        """Print the usage and ``medtune: error: <message>`` to stderr, then exit with status 2."""
        self.print_usage(sys.stderr)
        self.exit(2, f"medtune: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """Build the ``medtune`` parser with every available subcommand registered.

    Returns:
        The top-level parser; each subcommand sets ``func`` (and ``accepts_extra_args`` when it
        takes arbitrary trailing flags, like ``run``).
    """
    parser = _Parser(
        prog="medtune",
        description="medtune: fine-tune and evaluate medical vision-language models.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(func=None)
    subparsers = parser.add_subparsers(title="commands", metavar="<command>")
    for module in (ls, cp, cat, validate, run, score):
        module.register(subparsers)
    from . import export, plot  # each imports its heavy libraries only when run

    plot.register(subparsers)
    export.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``) and run the chosen subcommand.

    Args:
        argv: command line without the program name.

    Returns:
        The exit status. ``SystemExit`` raised by a recipe that ``medtune run`` executes
        in-process propagates unchanged.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.func is None:
        parser.print_help()
        return 0
    if extra:
        if not getattr(args, "accepts_extra_args", False):
            parser.error("unrecognized arguments: " + " ".join(extra))
        # argparse sets aside unknown options that come before the first positional; for `run`
        # these are the torchrun flags, which precede the recipe in the original order.
        args.argv = extra + args.argv
    return run_entry("medtune", lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
