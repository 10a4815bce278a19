"""Reading a recipe's config: typed keys (:func:`cfg_get` and its checks) and the known top-level keys.

``cfg_get`` and the checks (``positive``, ``non_negative``, ``at_least``, ``in_range``,
``one_of``) moved here from ``medtune/utils/errors.py``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from medtune.utils.errors import ConfigError, describe, did_you_mean

#: ``cfg_get``'s default meaning "the key is required".
MISSING: Any = object()


def unknown_keys(cfg: Any, known: Iterable[str]) -> list[tuple[str, str]]:
    """The top-level keys of ``cfg`` that are not in ``known``, each with its close-match hint:
    ``[("epochz", " (did you mean 'epochs'?)")]``."""
    known = set(known)
    return [(k, did_you_mean(k, known)) for k in sorted(set(cfg.keys()) - known)]


def check_keys(cfg: Any, known: Iterable[str], recipe: str) -> None:
    """Refuse top-level config keys the recipe does not read (a typo would be ignored silently).

    Args:
        cfg: the run's config (a mapping).
        known: the keys the recipe reads.
        recipe: the recipe's name, for the message.

    Raises:
        ConfigError: ``config key(s) not known to <recipe>: epochz (did you mean 'epochs'?)``.
    """
    unknown = unknown_keys(cfg, known)
    if unknown:
        raise ConfigError(
            f"config key(s) not known to {recipe}: {', '.join(k + hint for k, hint in unknown)}; "
            f"known: {', '.join(sorted(known))}"
        )


def optional_component(cfg: Any, key: str) -> Any:
    """The component config at ``key``, or None when it is absent, null, or was switched off on
    the command line (``val_dataset=null`` over a node with a ``_component_`` leaves
    ``{_component_: None, ...}``: torchtune's override parser sets the component, not the node)."""
    node = cfg.get(key) if hasattr(cfg, "get") else None
    if not node or not hasattr(node, "get") or node.get("_component_") is None:
        return None
    return node


class _Check:
    def __init__(self, fn: Callable[[Any], bool], message: str) -> None:
        self.fn, self.message = fn, message

    def __call__(self, value: Any) -> bool:
        return bool(self.fn(value))


def positive() -> _Check:
    """Check for :func:`cfg_get`: ``> 0``."""
    return _Check(lambda v: v > 0, "must be > 0")


def non_negative() -> _Check:
    """Check for :func:`cfg_get`: ``>= 0``."""
    return _Check(lambda v: v >= 0, "must be >= 0")


def at_least(low: float) -> _Check:
    """Check for :func:`cfg_get`: ``>= low``."""
    return _Check(lambda v: v >= low, f"must be >= {low}")


def in_range(low: float, high: float) -> _Check:
    """Check for :func:`cfg_get`: ``low <= value <= high``."""
    return _Check(lambda v: low <= v <= high, f"must be in [{low}, {high}]")


def one_of(*choices: Any) -> _Check:
    """Check for :func:`cfg_get`: one of ``choices``."""
    return _Check(lambda v: v in choices, "must be one of " + ", ".join(map(repr, choices)))


def _lookup(cfg: Any, key: str) -> Any:
    node = cfg
    for part in key.split("."):
        if isinstance(node, Mapping) or hasattr(node, "keys"):
            if part not in node:
                return MISSING
            node = node[part]
        elif isinstance(node, (list, tuple)) or type(node).__name__ == "ListConfig":
            if not part.isdigit() or int(part) >= len(node):
                return MISSING
            node = node[int(part)]
        else:
            return MISSING
    return node


_KIND_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _convert(value: Any, kind: type) -> Any:
    """``value`` as ``kind``, or raise ValueError. Config values may be strings from overrides."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ValueError
    if isinstance(value, bool):  # True is an int to Python, never to a config
        raise ValueError
    if kind is int:
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
            return int(value)
        raise ValueError
    if kind is float:
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            return float(value)  # "1e-4": YAML 1.1 reads it as a string
        raise ValueError
    if kind is str:
        if isinstance(value, (str, int, float)):
            return str(value)
        raise ValueError
    if kind in (list, dict):
        if hasattr(value, "_content"):  # an omegaconf node
            from omegaconf import OmegaConf

            value = OmegaConf.to_container(value, resolve=True)
        if isinstance(value, kind):
            return value
        raise ValueError
    if isinstance(value, kind):
        return value
    return kind(value)


def _lambda_text(fn: Callable) -> str:
    """``must satisfy v > 0`` for ``check=lambda v: v > 0`` (from its source), else a generic text."""
    import inspect

    try:
        found = re.findall(r"lambda\s+\w+\s*:\s*([^,)]+)", inspect.getsource(fn))
    except (OSError, TypeError):
        found = []
    return f"must satisfy {found[0].strip()}" if len(found) == 1 else "failed its check"


def cfg_get(cfg: Any, key: str, kind: type, default: Any = MISSING, *, check=None) -> Any:
    """Read a (dotted) config key as ``kind``; a bad value is a :class:`ConfigError` naming the key.

    Args:
        cfg: a DictConfig or a plain mapping.
        key: dotted key, ``"batch_size"`` or ``"optimizer.lr"`` (list elements by index).
        kind: ``int``, ``float``, ``bool``, ``str``, ``list``, ``dict`` or another type
            (``kind(value)`` converts). ``bool`` never passes as ``int``; ``"1e-4"`` passes as float.
        default: returned when the key is absent or null; without it the key is required.
        check: a callable on the converted value that returns False (or a message string) when
            the value is bad; the checks here (``positive()``, ``in_range(0, 1)``, ...) carry their
            message. A ``(callable, message)`` pair works too.

    Returns:
        The converted value (or ``default``).

    Raises:
        ConfigError: ``key: missing (expected an integer)``, ``batch_size: expected an integer,
            got 'abc'``, ``optimizer.lr: must be > 0, got -0.1``.
    """
    expected = _KIND_NAMES.get(kind, f"a {getattr(kind, '__name__', kind)}")
    try:
        value = _lookup(cfg, key)
    except Exception as e:  # an interpolation that does not resolve, a ??? value
        message = describe(e)
        if message is None:
            raise
        raise ConfigError(message if message.startswith(key) else f"{key}: {message}") from None
    if value is MISSING or value is None:
        if default is MISSING:
            raise ConfigError(f"{key}: missing (expected {expected})")
        return default
    try:
        out = _convert(value, kind)
    except (ValueError, TypeError):
        raise ConfigError(f"{key}: expected {expected}, got {value!r}") from None
    if check is not None:
        fn, message = (
            check if isinstance(check, tuple) else (check, getattr(check, "message", None))
        )
        verdict = fn(out)
        if verdict is False or isinstance(verdict, str):
            why = verdict if isinstance(verdict, str) else message or _lambda_text(fn)
            raise ConfigError(f"{key}: {why}, got {out!r}")
    return out
