"""``medtune ls``: a table of the recipes and their configs (fast: no torch import)."""

from __future__ import annotations

import argparse
import sys

from . import registry

EPILOG = """\
example:
  $ medtune ls
  RECIPE           CONFIG
  vision_finetune  vision_finetune/demo
                   vision_finetune/slake
  generate         -

Aliases are old recipe names that still work: each runs the recipe named after the arrow
(`medtune run full_finetune_single_device --config slake` runs full_finetune/slake_single_device).

A config is named <recipe>/<config> for `medtune cp`, `cat` and `validate`;
`medtune run <recipe> --config <config>` also takes the short name:
  $ medtune run vision_finetune --config demo

Recipes are read from $MEDTUNE_RECIPES_DIR when it is set (a folder holding <recipe>.py files
and configs/<recipe>/<config>.yaml), else from the recipes medtune ships.
"""

NULL_VALUE = "-"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``ls`` subcommand.

    Args:
        subparsers: the object returned by ``ArgumentParser.add_subparsers()``.
    """
    parser = subparsers.add_parser(
        "ls",
        help="list recipes and their configs",
        description="List the recipes medtune ships and each recipe's configs.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(func=_ls)


def _ls(args: argparse.Namespace) -> int:
    recipes = registry.list_recipes()
    rows = []
    for recipe in recipes:
        names = [c.full_name for c in recipe.configs] or [NULL_VALUE]
        rows.extend((recipe.name if i == 0 else "", name) for i, name in enumerate(names))
    names = [r.name for r in recipes] + list(registry.ALIASES)
    width = max([len("RECIPE"), *(len(n) for n in names)]) + 2
    lines = [f"{'RECIPE':<{width}}CONFIG"] + [f"{a:<{width}}{b}".rstrip() for a, b in rows]
    aliases = [a for a in registry.ALIASES.values() if registry.get_alias(a.name)]
    if aliases:
        lines.append("")
        lines.append(f"{'ALIAS':<{width}}RUNS")
        lines.extend(f"{a.name:<{width}}{a.recipe}" for a in aliases)
    print("\n".join(lines))
    if not recipes:
        where = registry.recipes_root()
        found_in = f"in {where}" if where else "(no recipes folder)"
        print(f"medtune: no recipes found {found_in}; see ${registry.ENV_VAR}", file=sys.stderr)
    return 0
