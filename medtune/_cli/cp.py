"""``medtune cp``: copy a recipe script or a config to edit it (fast: no torch import)."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from . import registry
from ._errors import CLIError, did_you_mean

EPILOG = """\
examples:
  $ medtune cp vision_finetune/demo my_demo.yaml
  Copied .../recipes/configs/vision_finetune/demo.yaml to my_demo.yaml
  $ medtune cp vision_finetune ./my_recipes/ --make-parents
  Copied .../recipes/vision_finetune.py to my_recipes/vision_finetune.py

A destination that is a folder (existing, or ending in '/') keeps the file name; one without the
right suffix gets '.py' (recipe) or '.yaml' (config) appended. An existing file is overwritten
unless -n is given, in which case nothing is copied and the exit status is still 0 (like cp -n).
Then run the copy the same way as the original:
  $ medtune run vision_finetune --config my_demo.yaml
  $ medtune run my_recipes/vision_finetune.py --config vision_finetune/demo
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``cp`` subcommand.

    Args:
        subparsers: the object returned by ``ArgumentParser.add_subparsers()``.
    """
    parser = subparsers.add_parser(
        "cp",
        help="copy a recipe or config to edit it",
        description="Copy a recipe script or a config to a local path.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("source", metavar="<recipe | recipe/config>", help="what to copy")
    parser.add_argument("destination", metavar="<dest>", help="file or folder to copy to")
    parser.add_argument(
        "--make-parents",
        action="store_true",
        help="create the destination's missing parent folders",
    )
    parser.add_argument(
        "-n",
        "--no-clobber",
        action="store_true",
        help="do not overwrite an existing file (skip with a message, exit status 0)",
    )
    parser.set_defaults(func=_cp)


def _source(spec: str) -> tuple[Path, tuple[str, ...], str]:
    """Return (file, accepted suffixes, run hint) for a recipe name or a config name."""
    recipe, alias = registry.recipe_or_alias(spec.removesuffix(".py"))
    if alias is not None:
        print(f"medtune: {alias.name} is an alias of recipe {alias.recipe}: copying that")
    if recipe is not None:
        first = recipe.configs[0].full_name if recipe.configs else "<config>"
        return recipe.path, (".py",), f"medtune run {{dest}} --config {first}"
    cfg = registry.find_config(spec)
    if cfg is not None:
        return cfg.path, registry.CONFIG_SUFFIXES, f"medtune run {cfg.recipe} --config {{dest}}"
    recipes = registry.list_recipes()
    names = [r.name for r in recipes] + [c.full_name for r in recipes for c in r.configs]
    raise CLIError(
        f"nothing to copy called '{spec}'{did_you_mean(spec, names)}; give a recipe or "
        "<recipe>/<config>, see `medtune ls`"
    )


def _cp(args: argparse.Namespace) -> int:
    src, suffixes, hint = _source(args.source)
    raw = args.destination
    dest = Path(raw).expanduser()
    if raw.endswith(("/", "\\")) or dest.is_dir():
        if not dest.is_dir():
            if not args.make_parents:
                raise CLIError(
                    f"destination folder '{raw}' does not exist (add --make-parents to create it)"
                )
            dest.mkdir(parents=True, exist_ok=True)
        dest = dest / src.name
    elif dest.suffix not in suffixes:
        dest = dest.with_name(dest.name + suffixes[0])
    if not dest.parent.is_dir():
        if not args.make_parents:
            raise CLIError(
                f"cannot copy to '{dest}': folder '{dest.parent}' does not exist "
                "(add --make-parents to create it)"
            )
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CLIError(f"cannot create folder '{dest.parent}': {e.strerror or e}") from None
    if dest.exists():
        if dest.is_dir():
            raise CLIError(f"cannot copy to '{dest}': it is a folder")
        if dest.resolve() == src.resolve():
            raise CLIError(f"'{dest}' is the source file itself")
        if args.no_clobber:
            print(f"Not copied: {dest} already exists (-n/--no-clobber).")
            return 0
    try:
        shutil.copyfile(src, dest)
    except OSError as e:
        raise CLIError(f"cannot copy to '{dest}': {e.strerror or e}") from None
    print(f"Copied {src} to {dest}")
    print("Run it with: " + hint.format(dest=dest))
    return 0
