"""``medtune cat``: print a registered config, comments included (fast: no torch import)."""

from __future__ import annotations

import argparse
import sys

from . import registry
from ._errors import CLIError

EPILOG = """\
example:
  $ medtune cat vision_finetune/demo
  # Config for vision_finetune ...
  output_dir: /tmp/medtune/demo
  ...

See the configs with `medtune ls`; copy one to edit it with `medtune cp`.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``cat`` subcommand.

    Args:
        subparsers: the object returned by ``ArgumentParser.add_subparsers()``.
    """
    parser = subparsers.add_parser(
        "cat",
        help="print a config",
        description="Print a recipe's config file as it is (YAML, with its comments).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", metavar="<recipe/config>", help="config to print")
    parser.set_defaults(func=_cat)


def _cat(args: argparse.Namespace) -> int:
    cfg = registry.find_config(args.config)
    if cfg is None:
        raise registry.unknown_config_error(args.config)
    try:
        text = cfg.path.read_text(encoding="utf-8")
    except OSError as e:
        raise CLIError(f"cannot read {cfg.path}: {e.strerror or e}") from None
    sys.stdout.write(text if text.endswith("\n") or not text else text + "\n")
    return 0
