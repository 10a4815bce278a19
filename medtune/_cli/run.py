"""``medtune run``: run a recipe in-process, or under ``torch.distributed.run`` with torchrun flags.

``medtune run [TORCHRUN-FLAGS] <recipe | path.py> --config <name | recipe/config | path.yaml>
[key=value | +key=value | ~key ...]``

* The recipe is a registered name (``medtune ls``) or a path to a ``.py`` file (e.g. a copy made
  with ``medtune cp``).
* The config is a file path (a ``.yaml`` path that exists is always taken as a path), else one of
  the recipe's configs by short name, else ``<recipe>/<config>``. A copied recipe
  ``my/vision_finetune.py`` also finds ``vision_finetune``'s configs by short name.
* Overrides are checked against the YAML before anything starts: ``key=value`` needs an existing
  key (dotted path), ``+key=value`` adds a key (the ``+`` is stripped: torchtune's parser does not
  know it) and ``~key`` removes one. Keys inside lists cannot be overridden (torchtune 0.6.1's
  merge fails on them); neither can values containing ``=`` (torchtune splits on every ``=``).
* Without torchrun flags the recipe runs in this process (``runpy.run_path``, ``__main__``) with
  ``sys.argv = [recipe, "--config", <yaml>, *overrides]``; its exit status is ours.
* Any flag before the recipe is a torchrun flag (``--nproc_per_node 2``, ``--nnodes``,
  ``--rdzv_endpoint``, ``--master_port``, ``--standalone``, ...), parsed by torchrun's own parser,
  and the recipe is launched through ``torch.distributed.run``. A single-node launch without a
  rendezvous endpoint or master port runs ``--standalone`` (a free port is picked). A registered
  recipe must declare ``SUPPORTS_DISTRIBUTED = True``; a recipe file of the user's without the
  constant is launched with a note.
* The current directory is importable by the recipe (in-process and in every rank).
* An old recipe name (:data:`medtune._cli.registry.ALIASES`, e.g. ``full_finetune_single_device``)
  runs the recipe it became with the config the old name meant, and says which on stderr.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
from pathlib import Path

from medtune.utils.errors import passthrough

from . import registry
from ._errors import CLIError
from .needs import check_needed_paths
from .overrides import check_overrides

USAGE = (
    "medtune run [TORCHRUN-FLAGS] <recipe | path.py> --config <name | recipe/config | path.yaml> "
    "[key=value | +key=value | ~key ...]"
)

EPILOG = """\
examples:
  # run a recipe with one of its configs, in this process
  $ medtune run vision_finetune --config demo

  # override values (keys must exist in the config; +key=value adds one, ~key removes one)
  $ medtune run vision_finetune --config demo optimizer.lr=1e-4 +tags=baseline ~seed

  # your own copies (see `medtune cp`)
  $ medtune run ./my_recipe.py --config ./my_demo.yaml

  # torchrun flags go before the recipe: launch 2 processes through torch.distributed.run
  $ medtune run --nproc_per_node 2 vision_finetune --config demo

Recipes that can run distributed say so in their file: SUPPORTS_DISTRIBUTED = True.
`medtune run <recipe> --help` prints the recipe's documentation.
"""

_TORCHRUN_ERROR_HINT = "torchrun flags go before the recipe; --config and overrides after it"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``run`` subcommand.

    Args:
        subparsers: the object returned by ``ArgumentParser.add_subparsers()``.
    """
    parser = subparsers.add_parser(
        "run",
        help="run a recipe (in-process, or with torchrun flags through torch.distributed.run)",
        description="Run a recipe with a config and key=value overrides.",
        usage=USAGE,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument(
        "argv",
        nargs=argparse.REMAINDER,
        metavar="...",
        help="[TORCHRUN-FLAGS] <recipe> --config <config> [overrides]",
    )
    parser.set_defaults(func=_run, accepts_extra_args=True)


# ----------------------------------------------------------------------------- recipe and config


def resolve_recipe(spec: str) -> tuple[Path, registry.Recipe | None]:
    """Return the script for a registered recipe name (or alias) or a ``.py`` path, and the
    registry entry.

    Raises:
        CLIError: unknown name (with close matches) or missing file.
    """
    recipe, _ = registry.recipe_or_alias(spec)
    if recipe is not None:
        return recipe.path, recipe
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix != ".py":
            raise CLIError(f"recipe must be a registered name or a .py file, got '{spec}'")
        return path.resolve(), None
    cfg = registry.find_config(spec) if "/" in spec and path.suffix != ".py" else None
    if cfg is not None:
        raise CLIError(
            f"'{spec}' is a config, not a recipe: medtune run {cfg.recipe} --config {cfg.name}"
        )
    if path.suffix == ".py" or "/" in spec or os.sep in spec:
        raise CLIError(f"recipe file not found: {spec}")
    raise registry.unknown_recipe_error(spec)


def resolve_config(
    spec: str, script: Path, recipe: registry.Recipe | None, alias: registry.Alias | None = None
) -> Path:
    """Return the YAML file for ``--config`` (see the module docstring for the order); under an
    alias, an old config name is first mapped to the recipe's (``slake`` ->
    ``slake_single_device``).

    Raises:
        CLIError: not found, with close matches among the recipe's configs.
    """
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix in registry.CONFIG_SUFFIXES:
        return path.resolve()
    owner = recipe
    if owner is None:  # a copied script keeps its recipe's (or alias's) name
        owner, alias = registry.recipe_or_alias(script.stem)
    if alias is not None and owner is not None:
        cfg = owner.config(alias.config_name(spec))
        if cfg is not None:
            return cfg.path
    cfg = registry.find_config(spec, owner)
    if cfg is not None:
        return cfg.path
    if path.is_file():
        return path.resolve()
    if path.suffix in registry.CONFIG_SUFFIXES:
        raise CLIError(f"config file not found: {spec}")
    raise registry.unknown_config_error(spec, owner)


def split_recipe_args(recipe_name: str, rest: list[str]) -> tuple[str | None, list[str], bool]:
    """Split what follows the recipe into (``--config`` value, overrides, help requested).

    Raises:
        CLIError: ``--config`` without value or given twice, or a stray ``--flag``.
    """
    config, overrides, want_help = None, [], False
    i = 0
    while i < len(rest):
        tok = rest[i]
        if tok == "--config" or tok.startswith("--config="):
            if tok == "--config":
                if i + 1 >= len(rest) or rest[i + 1].startswith("--"):
                    raise CLIError("--config needs a value: --config <name | recipe/config | path>")
                value, i = rest[i + 1], i + 2
            else:
                value, i = tok.split("=", 1)[1], i + 1
            if config is not None:
                raise CLIError("--config given more than once")
            if not value:
                raise CLIError("--config needs a value: --config <name | recipe/config | path>")
            config = value
            continue
        if tok in ("-h", "--help"):
            want_help = True
        elif tok.startswith("-"):
            raise CLIError(
                f"unexpected option '{tok}' after the recipe '{recipe_name}': {_TORCHRUN_ERROR_HINT} "
                f"(e.g. medtune run --nproc_per_node 2 {recipe_name} --config <config>)"
            )
        else:
            overrides.append(tok)
        i += 1
    return config, overrides, want_help


# ----------------------------------------------------------------------------- launching


def _parse_torchrun(tokens: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Parse ``[flags..., recipe, recipe args...]`` with torchrun's parser.

    Returns:
        torchrun's namespace and the flag tokens before the recipe.
    """
    from torch.distributed.run import get_args_parser

    parser = get_args_parser()
    parser.prog = "medtune run"
    parser.allow_abbrev = False

    def error(message: str):
        if "training_script" in message:
            raise CLIError(f"missing recipe after the torchrun flags; usage: {USAGE}")
        raise CLIError(f"torchrun flags: {message} ({_TORCHRUN_ERROR_HINT})")

    parser.error = error  # report as one medtune error line instead of exiting
    ns = parser.parse_args(tokens)
    flags = tokens[: len(tokens) - len(ns.training_script_args) - 1]
    if ns.module or ns.no_python:
        raise CLIError("-m/--module and --no-python are not supported: medtune runs recipe files")
    given = {
        action.dest
        for action in parser._actions
        for tok in flags
        for opt in action.option_strings
        if tok == opt or tok.startswith(opt + "=")
    }
    single_node = str(ns.nnodes) in ("1", "1:1")
    explicit_rdzv = given & {"rdzv_endpoint", "rdzv_backend", "master_addr", "master_port"}
    if not ns.standalone and not ns.rdzv_endpoint and single_node and not explicit_rdzv:
        ns.standalone = True  # one node, no endpoint: let torchrun pick a free port
    return ns, flags


def _run_in_process(script: Path, argv: list[str]) -> int:
    old_argv, old_path = sys.argv[:], sys.path[:]
    sys.argv = [str(script), *argv]
    for entry in (os.getcwd(), str(script.parent)):  # like `python script.py`, plus the cwd
        if entry not in sys.path:
            sys.path.insert(0, entry)
    try:
        with passthrough():  # the recipe's own error policy applies, as under `python recipe.py`
            runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv, sys.path[:] = old_argv, old_path
    return 0


def _run_distributed(ns: argparse.Namespace, script: Path, argv: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import run

    # each rank runs the recipe through medtune._cli.launch (medtune's quiet filter, then the
    # script as `python script.py` would run it)
    ns.module = True
    ns.training_script = "medtune._cli.launch"
    ns.training_script_args = [str(script), *argv]
    old_pythonpath = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [os.getcwd(), old_pythonpath]))
    print(f"medtune: launching {script.name} with torchrun", file=sys.stderr, flush=True)
    try:
        run(ns)
    except ChildFailedError as e:
        # The failing ranks printed their own tracebacks; summarise, do not trace back again.
        print(str(e), file=sys.stderr)
        _, failure = e.get_first_failure()
        return failure.exitcode if failure.exitcode > 0 else 1
    finally:
        if old_pythonpath is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old_pythonpath
    return 0


def _distributed_recipes() -> str:
    names = [r.name for r in registry.list_recipes() if r.supports_distributed]
    return ", ".join(names) if names else "none"


def _run(args: argparse.Namespace) -> int:
    tokens = list(args.argv)
    if not tokens:
        raise CLIError(f"missing recipe; usage: {USAGE}")
    torchrun_ns, flags = None, []
    if tokens[0].startswith("-"):
        torchrun_ns, flags = _parse_torchrun(tokens)
        recipe_spec, rest = torchrun_ns.training_script, list(torchrun_ns.training_script_args)
    else:
        recipe_spec, rest = tokens[0], tokens[1:]

    script, recipe = resolve_recipe(recipe_spec)
    alias = registry.get_alias(recipe_spec) if recipe is not None else None
    config_spec, overrides, want_help = split_recipe_args(recipe_spec, rest)
    if want_help:
        doc = registry.read_docstring(script) or "(this recipe has no docstring)"
        print(f"usage: {USAGE}\n\n{script}:\n\n{doc}")
        return 0
    if config_spec is None:
        listed = ", ".join(c.name for c in recipe.configs) if recipe and recipe.configs else ""
        raise CLIError(
            f"missing --config: medtune run {recipe_spec} --config <config>"
            + (f" (its configs: {listed})" if listed else "")
        )
    if torchrun_ns is not None:
        supports = registry.read_supports_distributed(script)
        if supports is False or (recipe is not None and supports is None):
            raise CLIError(
                f"recipe '{recipe_spec}' does not support distributed runs (its file does not set "
                f"SUPPORTS_DISTRIBUTED = True); drop the torchrun flags {' '.join(flags)!r} "
                f"(distributed recipes: {_distributed_recipes()})"
            )
        if supports is None:
            print(
                f"medtune: note: {script.name} does not set SUPPORTS_DISTRIBUTED; "
                "launching it with torchrun anyway",
                file=sys.stderr,
            )
    cfg_path = resolve_config(config_spec, script, recipe, alias)
    if alias is not None:
        print(
            f"medtune: {alias.name} is an alias: running recipe {alias.recipe} with config "
            f"{cfg_path.parent.name}/{cfg_path.stem}",
            file=sys.stderr,
            flush=True,
        )
    argv = ["--config", str(cfg_path), *check_overrides(overrides, cfg_path)]
    check_needed_paths(cfg_path, argv[2:])  # a missing demo asset / checkpoint: name its maker
    if torchrun_ns is None:
        return _run_in_process(script, argv)
    return _run_distributed(torchrun_ns, script, argv)
