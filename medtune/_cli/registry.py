"""Where medtune's recipes and configs live, found without importing torch or the recipes.

Layout under a recipes root::

    <root>/<recipe>.py                      a recipe script (names starting with "_" are skipped)
    <root>/configs/<recipe>/<config>.yaml   its configs (sub-folders allowed: "llama3/8b")

The root is, in order:

1. ``$MEDTUNE_RECIPES_DIR`` when set (tests and users with their own recipe collection);
2. ``medtune/_recipes`` inside the installed package (a wheel: pyproject force-includes
   ``recipes/`` there, so no top-level ``recipes`` package is ever installed);
3. ``<checkout>/recipes`` next to the ``medtune`` package (an editable install).

A config is named ``<recipe>/<config>`` everywhere in the CLI (``medtune cp vision_finetune/demo``);
``medtune run <recipe> --config <config>`` also takes the short name. Whether a recipe may be
launched with torchrun flags is the module-level constant ``SUPPORTS_DISTRIBUTED = True|False`` in
the recipe file itself, read with :mod:`ast` (the recipe is never imported here).

Aliases (:data:`ALIASES`) keep working the names of recipes that were merged into another: the four
``{full,lora}_finetune_{single_device,distributed}`` recipes became ``full_finetune`` and
``lora_finetune`` (one file for 1..N processes). ``medtune run <alias> --config <old config>``
runs the new recipe with the config the old name meant (``full_finetune_single_device --config
slake`` -> ``full_finetune/slake_single_device``) and says so on stderr; ``<alias>/<config>``
names a config everywhere (``medtune cp lora_finetune_single_device/demo my.yaml``).
"""

from __future__ import annotations

import ast
import os
from dataclasses import dataclass
from pathlib import Path

import medtune

from ._errors import CLIError, did_you_mean

ENV_VAR = "MEDTUNE_RECIPES_DIR"
CONFIG_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True)
class Config:
    """One YAML config of a recipe.

    Attributes:
        recipe: name of the recipe it belongs to.
        name: config name relative to ``configs/<recipe>/`` without suffix (e.g. ``demo``).
        path: absolute path of the YAML file.
    """

    recipe: str
    name: str
    path: Path

    @property
    def full_name(self) -> str:
        """``<recipe>/<name>``, the form ``medtune cp``/``cat``/``validate`` take."""
        return f"{self.recipe}/{self.name}"


@dataclass(frozen=True)
class Recipe:
    """One recipe script and its configs.

    Attributes:
        name: file stem of the script (``vision_finetune``).
        path: absolute path of the script.
        configs: its configs, sorted by name.
    """

    name: str
    path: Path
    configs: tuple[Config, ...]

    @property
    def supports_distributed(self) -> bool | None:
        """The file's ``SUPPORTS_DISTRIBUTED`` constant, or None when it has none."""
        return read_supports_distributed(self.path)

    def config(self, name: str) -> Config | None:
        """Return this recipe's config called ``name`` (no ``.yaml`` suffix), or None."""
        for cfg in self.configs:
            if cfg.name == name:
                return cfg
        return None


@dataclass(frozen=True)
class Alias:
    """An old recipe name that runs another recipe.

    Attributes:
        name: the old name (``full_finetune_single_device``).
        recipe: the recipe it runs (``full_finetune``).
        renamed: ``(old config name, new config name)`` pairs for the configs whose name
            changed in the move; every other config keeps its name.
    """

    name: str
    recipe: str
    renamed: tuple[tuple[str, str], ...] = ()

    def config_name(self, name: str) -> str:
        """The recipe's config name for the old config ``name``."""
        return dict(self.renamed).get(name, name)


_SINGLE = (("slake", "slake_single_device"), ("vqa_rad", "vqa_rad_single_device"))

#: Old recipe names -> the recipe they run now (issue 25: five training recipes became three).
ALIASES: dict[str, Alias] = {
    a.name: a
    for a in (
        Alias("full_finetune_single_device", "full_finetune", _SINGLE),
        Alias("full_finetune_distributed", "full_finetune"),
        Alias("lora_finetune_single_device", "lora_finetune", _SINGLE),
        Alias("lora_finetune_distributed", "lora_finetune"),
    )
}


def get_alias(name: str) -> Alias | None:
    """The alias called ``name`` whose recipe exists under :func:`recipes_root`, or None."""
    alias = ALIASES.get(name)
    if alias is None or get_recipe(alias.recipe) is None:
        return None
    return alias


def recipe_or_alias(name: str) -> tuple[Recipe | None, Alias | None]:
    """The recipe registered as ``name``, or the one the alias ``name`` runs (with the alias)."""
    recipe = get_recipe(name)
    if recipe is not None:
        return recipe, None
    alias = get_alias(name)
    if alias is not None:
        return get_recipe(alias.recipe), alias
    return None, None


def recipes_root() -> Path | None:
    """Return the directory recipes are read from (see module docstring), or None if none exists.

    Raises:
        CLIError: ``$MEDTUNE_RECIPES_DIR`` is set but is not a directory.
    """
    env = os.environ.get(ENV_VAR)
    if env:
        root = Path(env).expanduser()
        if not root.is_dir():
            raise CLIError(f"{ENV_VAR}={env} is not a directory")
        return root.resolve()
    package_dir = Path(medtune.__file__).resolve().parent
    for root in (package_dir / "_recipes", package_dir.parent / "recipes"):
        if root.is_dir():
            return root
    return None


def read_supports_distributed(path: Path) -> bool | None:
    """Read the module-level ``SUPPORTS_DISTRIBUTED = True|False`` of a recipe file with ``ast``.

    Args:
        path: a Python file.

    Returns:
        The last literal boolean assigned to ``SUPPORTS_DISTRIBUTED`` at module level, or None
        when there is none (or the file cannot be read or parsed).
    """
    try:
        tree = ast.parse(Path(path).read_text(encoding="utf-8"), filename=str(path))
    except (OSError, SyntaxError, ValueError, UnicodeDecodeError):
        return None
    value = None
    for node in tree.body:
        if isinstance(node, ast.Assign):
            targets, rhs = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, rhs = [node.target], node.value
        else:
            continue
        named = any(isinstance(t, ast.Name) and t.id == "SUPPORTS_DISTRIBUTED" for t in targets)
        if named and isinstance(rhs, ast.Constant) and isinstance(rhs.value, bool):
            value = rhs.value
    return value


def read_known_keys(path: Path) -> set[str] | None:
    """The module-level ``KNOWN_KEYS`` of a recipe file, read with ``ast`` (no import).

    ``KNOWN_KEYS`` is a literal set of strings, or a union (``|``) of such sets and of names
    imported from a ``medtune`` module that defines them as literal sets
    (``KNOWN_KEYS = FINETUNE_KEYS | {"save_merged"}`` with ``from medtune.training.run import
    FINETUNE_KEYS``: the keys every fine-tuning recipe shares). None when the recipe declares none
    or it cannot be read that way.
    """
    tree = _parse(path)
    if tree is None:
        return None
    node = _assigned(tree, "KNOWN_KEYS")
    if node is None:
        return None
    return _key_set(node, _imported_names(tree))


def _parse(path: Path) -> ast.Module | None:
    try:
        return ast.parse(Path(path).read_text(encoding="utf-8"), filename=str(path))
    except (OSError, SyntaxError, ValueError, UnicodeDecodeError):
        return None


def _assigned(tree: ast.Module, name: str) -> ast.expr | None:
    """The value last assigned to ``name`` at module level."""
    value = None
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == name for t in node.targets
        ):
            value = node.value
    return value


def _imported_names(tree: ast.Module) -> dict[str, tuple[str, str]]:
    """``{local name: (module, name)}`` of the file's ``from medtune... import name`` lines."""
    out = {}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("medtune."):
            for alias in node.names:
                out[alias.asname or alias.name] = (node.module, alias.name)
    return out


def _key_set(node: ast.expr, imported: dict[str, tuple[str, str]]) -> set[str] | None:
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        left, right = _key_set(node.left, imported), _key_set(node.right, imported)
        return None if left is None or right is None else left | right
    if isinstance(node, ast.Name) and node.id in imported:
        module, name = imported[node.id]
        package_dir = Path(medtune.__file__).resolve().parent
        rel = Path(*module.split(".")[1:])
        for candidate in (package_dir / rel.with_suffix(".py"), package_dir / rel / "__init__.py"):
            tree = _parse(candidate) if candidate.is_file() else None
            value = _assigned(tree, name) if tree is not None else None
            if value is not None:
                return _key_set(value, {})
        return None
    try:
        value = ast.literal_eval(node)
    except ValueError:
        return None
    return {str(k) for k in value} if isinstance(value, (set, frozenset, list, tuple)) else None


def read_docstring(path: Path) -> str | None:
    """Return the module docstring of a Python file without importing it (None if absent)."""
    try:
        return ast.get_docstring(ast.parse(Path(path).read_text(encoding="utf-8")))
    except (OSError, SyntaxError, ValueError, UnicodeDecodeError):
        return None


def _configs_of(root: Path, recipe: str) -> tuple[Config, ...]:
    folder = root / "configs" / recipe
    if not folder.is_dir():
        return ()
    found = []
    for path in folder.rglob("*"):
        if path.suffix in CONFIG_SUFFIXES and path.is_file():
            name = path.relative_to(folder).with_suffix("").as_posix()
            found.append(Config(recipe=recipe, name=name, path=path))
    return tuple(sorted(found, key=lambda c: c.name))


def list_recipes() -> list[Recipe]:
    """Return every recipe whose script exists under :func:`recipes_root`, sorted by name."""
    root = recipes_root()
    if root is None:
        return []
    recipes = []
    for path in sorted(root.glob("*.py")):
        if path.name.startswith("_") or not path.is_file():
            continue
        recipes.append(Recipe(name=path.stem, path=path, configs=_configs_of(root, path.stem)))
    return recipes


def get_recipe(name: str) -> Recipe | None:
    """Return the registered recipe called ``name`` (``.py`` suffix not accepted), or None."""
    for recipe in list_recipes():
        if recipe.name == name:
            return recipe
    return None


def unknown_recipe_error(name: str) -> CLIError:
    """Build the error for a recipe name that is not registered, with close matches."""
    names = [r.name for r in list_recipes()] + [a for a in ALIASES if get_alias(a)]
    hint = did_you_mean(name, names)
    return CLIError(f"unknown recipe '{name}'{hint}; run `medtune ls` to see the recipes")


def find_config(spec: str, recipe: Recipe | None = None) -> Config | None:
    """Find a registered config by name.

    Tried in order: ``spec`` among ``recipe``'s configs (when given); ``spec`` as
    ``<recipe>/<config>`` (``<alias>/<old config>`` too); ``spec`` as a bare config name that
    exactly one recipe has.

    Args:
        spec: ``<config>`` or ``<recipe>/<config>``.
        recipe: the recipe whose configs are searched first.

    Returns:
        The config, or None if nothing matches (or a bare name is ambiguous).
    """
    if recipe is not None and (cfg := recipe.config(spec)) is not None:
        return cfg
    recipes = list_recipes()
    if "/" in spec:
        head, _, rest = spec.partition("/")
        for r in recipes:
            if r.name == head and (cfg := r.config(rest)) is not None:
                return cfg
        alias = get_alias(head)
        if alias is not None:
            target = get_recipe(alias.recipe)
            if target is not None and (cfg := target.config(alias.config_name(rest))) is not None:
                return cfg
    matches = [cfg for r in recipes if (cfg := r.config(spec)) is not None]
    return matches[0] if len(matches) == 1 else None


def unknown_config_error(spec: str, recipe: Recipe | None = None) -> CLIError:
    """Build the error for a config that is neither registered nor a file, with close matches.

    Args:
        spec: what the user typed.
        recipe: the recipe it was looked up for, if any.
    """
    recipes = list_recipes()
    full = [c.full_name for r in recipes for c in r.configs]
    bare = [c.name for r in recipes for c in r.configs]
    ambiguous = sorted(c.full_name for r in recipes if (c := r.config(spec)) is not None)
    if len(ambiguous) > 1:
        return CLIError(
            f"config name '{spec}' is ambiguous: "
            + ", ".join(ambiguous)
            + "; give <recipe>/<config>"
        )
    if recipe is not None:
        own = [c.name for c in recipe.configs]
        hint = did_you_mean(spec, own) or did_you_mean(spec, full)
        listed = ", ".join(own) if own else "none"
        return CLIError(
            f"unknown config '{spec}' for recipe '{recipe.name}' and no such file{hint}; "
            f"its configs: {listed}"
        )
    hint = did_you_mean(spec, full) or did_you_mean(spec, bare)
    return CLIError(
        f"unknown config '{spec}'{hint}; configs are named <recipe>/<config>, see `medtune ls`"
    )
