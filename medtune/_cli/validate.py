"""``medtune validate``: check that every ``_component_`` of a config imports and its arguments bind.

Unlike torchtune's ``tune validate`` (top-level nodes only), every node of the config is walked,
nested components and lists included, and every problem is reported with its key path.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import sys
from pathlib import Path
from typing import Any

from . import registry
from ._errors import CLIError, did_you_mean

EPILOG = """\
examples:
  $ medtune validate vision_finetune/demo
  Config is well-formed!
  $ medtune validate my_demo.yaml
  medtune: error: my_demo.yaml has 2 problems:
    model.encoder: no module named 'foo'
    optimizer: unexpected argument 'lrr' (did you mean 'lr'?)

The current directory is on the import path, so components defined in your own modules work.
Missing required arguments are accepted: recipes may pass them when they instantiate.
"""

_VAR_KINDS = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.POSITIONAL_ONLY)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``validate`` subcommand.

    Args:
        subparsers: the object returned by ``ArgumentParser.add_subparsers()``.
    """
    parser = subparsers.add_parser(
        "validate",
        help="check that a config's components import and their arguments bind",
        description=(
            "Check a config: every _component_ must import and its keyword arguments must be "
            "accepted by its signature."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "config", metavar="<recipe/config | path.yaml>", help="registered config or a YAML file"
    )
    parser.add_argument(
        "--recipe",
        default=None,
        help="check the top-level keys against this recipe (default: the config's own recipe)",
    )
    parser.set_defaults(func=_validate)


def resolve_config_path(spec: str) -> Path:
    """Return the YAML file for a registered config name or an existing path.

    Raises:
        CLIError: neither a registered config nor an existing file.
    """
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    cfg = registry.find_config(spec)
    if cfg is not None:
        return cfg.path
    if path.suffix in registry.CONFIG_SUFFIXES:
        raise CLIError(f"config file not found: {spec}")
    raise registry.unknown_config_error(spec)


def load_config(path: Path) -> Any:
    """Load a YAML config with OmegaConf; a parse error becomes a one-line :class:`CLIError`."""
    from omegaconf import OmegaConf

    try:
        return OmegaConf.load(path)
    except Exception as e:  # yaml or omegaconf errors; report, do not trace back
        mark = getattr(e, "problem_mark", None)  # a YAML syntax error: name the line and column
        if mark is not None:
            why = getattr(e, "problem", None) or type(e).__name__
            raise CLIError(
                f"cannot parse config {path}: line {mark.line + 1} column {mark.column + 1}: {why}"
            ) from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CLIError(f"cannot parse config {path}: {first}") from None


def locate(dotted: str) -> Any:
    """Import and return the object at a dotted path such as ``torch.optim.AdamW``.

    Args:
        dotted: ``module.sub.attr`` path.

    Returns:
        The object.

    Raises:
        LookupError: with a short, user-facing reason.
    """
    parts = dotted.split(".")
    if not dotted or not all(parts):
        raise LookupError(f"invalid dotted path '{dotted}'")
    module = None
    for i in range(len(parts), 0, -1):
        name = ".".join(parts[:i])
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name and (name == e.name or name.startswith(e.name + ".")):
                continue  # this prefix is not a module: try a shorter one
            raise LookupError(f"cannot import '{dotted}': {e}") from None
        except Exception as e:  # the module itself fails to import
            raise LookupError(f"cannot import '{dotted}': {type(e).__name__}: {e}") from None
        break
    if module is None:
        raise LookupError(f"no module named '{parts[0]}'")
    obj = module
    for j in range(i, len(parts)):
        try:
            obj = getattr(obj, parts[j])
        except AttributeError:
            owner = ".".join(parts[:j])
            raise LookupError(f"'{owner}' has no attribute '{parts[j]}'") from None
    return obj


def check_component(target: Any, kwargs: dict[str, Any]) -> list[str]:
    """Return the problems binding ``kwargs`` to ``target``'s signature (empty if fine).

    Missing required arguments are not problems (recipes may pass them at instantiate time).
    """
    if not callable(target):
        return [f"'{target!r}' is not callable"]
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):
        return []  # no introspectable signature (some builtins): nothing to check
    params = sig.parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        names = [n for n, p in params.items() if p.kind not in _VAR_KINDS]
        bad = [k for k in kwargs if k not in params or params[k].kind in _VAR_KINDS]
        if bad:
            return [f"unexpected argument '{k}'{did_you_mean(k, names)}" for k in bad]
    try:
        sig.bind_partial(**kwargs)
    except TypeError as e:
        return [str(e)]
    return check_values(target, kwargs)


def _expected(value: Any, ann: Any) -> str | None:
    """None when ``value`` fits the annotation ``ann`` as far as can be told; else what was expected.

    Only ``Literal[...]``, ``int``, ``float``, ``bool``, ``str``, ``None`` and unions of them are
    checked; any other annotation accepts everything (no false alarms on paths, tensors, ...).
    """
    import types
    import typing

    origin = typing.get_origin(ann)
    if origin is typing.Literal:
        choices = typing.get_args(ann)
        return None if value in choices else "one of " + ", ".join(map(repr, choices))
    if origin in (typing.Union, types.UnionType):
        wants = []
        for arm in typing.get_args(ann):
            why = _expected(value, arm)
            if why is None:
                return None
            wants.append(why)
        return " or ".join(w for w in wants if w != "anything") if "anything" not in wants else None
    if ann is type(None):
        return None if value is None else "null"
    if ann is bool:
        return None if isinstance(value, bool) else "true or false"
    if ann is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if ann is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return None if ok else "a number"
    if ann is str:
        return None if isinstance(value, str) else "a string"
    return "anything"


def check_values(target: Any, kwargs: dict[str, Any]) -> list[str]:
    """Values that cannot be right for the target's annotated parameters (a ``Literal`` choice such
    as a connector kind, or a plainly typed number, flag or string)."""
    import typing

    fn = target.__init__ if inspect.isclass(target) else target
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # unresolvable annotations (forward references to optional packages)
        return []
    problems = []
    for key, value in kwargs.items():
        if key not in hints or (isinstance(value, str) and "${" in value):
            continue
        why = _expected(value, hints[key])
        if why not in (None, "anything"):
            problems.append(f"argument '{key}': {value!r} is not {why}")
    return problems


def _join(prefix: str, key: Any) -> str:
    if isinstance(key, int):
        return f"{prefix}[{key}]"
    return f"{prefix}.{key}" if prefix else str(key)


def collect_problems(node: Any, prefix: str = "") -> list[str]:
    """Walk a plain (``to_container``) config and return ``'<key path>: <problem>'`` lines."""
    problems: list[str] = []
    if isinstance(node, dict):
        if "_component_" in node:
            where = prefix or "<root>"
            dotted = node["_component_"]
            kwargs = {str(k): v for k, v in node.items() if k != "_component_"}
            if not isinstance(dotted, str):
                problems.append(f"{where}: _component_ must be a dotted path, got {dotted!r}")
            else:
                try:
                    target = locate(dotted)
                except LookupError as e:
                    problems.append(f"{where}: {e}")
                else:
                    problems.extend(f"{where}: {p}" for p in check_component(target, kwargs))
        for key, value in node.items():
            if key != "_component_":
                problems.extend(collect_problems(value, _join(prefix, key)))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            problems.extend(collect_problems(value, _join(prefix, i)))
    return problems


def _recipe_of(spec: str, path: Path, explicit: str | None) -> registry.Recipe | None:
    """The recipe whose keys the config must use: ``--recipe``, a registered ``recipe/config``,
    or the recipe folder a YAML file sits in (``.../configs/<recipe>/x.yaml``)."""
    if explicit:
        recipe = registry.get_recipe(explicit)
        if recipe is None:
            raise registry.unknown_recipe_error(explicit)
        return recipe
    found = registry.find_config(spec) if not Path(spec).expanduser().is_file() else None
    if found is not None:
        return registry.get_recipe(found.recipe)
    if path.parent.parent.name == "configs":
        return registry.get_recipe(path.parent.name)
    return None


def _validate(args: argparse.Namespace) -> int:
    from omegaconf import OmegaConf

    path = resolve_config_path(args.config)
    cfg = load_config(path)
    recipe = _recipe_of(args.config, path, args.recipe)
    key_problems = []
    known = registry.read_known_keys(recipe.path) if recipe is not None else None
    if known is not None:
        from medtune.utils.config import unknown_keys

        key_problems = [
            f"{k}: not a key of {recipe.name}{hint}" for k, hint in unknown_keys(cfg, known)
        ]
    try:
        plain = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # an interpolation the recipe resolves later (custom resolver, ...)
        plain = OmegaConf.to_container(cfg, resolve=False)
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        problems = key_problems + collect_problems(plain)
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)
    if problems:
        n = len(problems)
        lines = [f"medtune: error: {args.config} has {n} problem{'s' if n > 1 else ''}:"]
        lines += [f"  {p}" for p in problems]
        print("\n".join(lines), file=sys.stderr)
        return 1
    print(f"Config is well-formed! ({path})")
    return 0
