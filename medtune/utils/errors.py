"""The one error policy: user errors are one line, bugs keep their traceback.

Every recipe and ``tools/`` script ends with::

    if __name__ == "__main__":
        sys.exit(run_entry("vision_finetune", recipe_main))

:func:`run_entry` runs the entry point. A :class:`UserError` (bad config key or value, bad row,
missing or corrupt file, ...) and the library errors that stand for one (see :func:`describe`)
print ``<name>: error: <message>`` on stderr, one line, and give exit status 1; Ctrl-C prints
``<name>: interrupted`` (status 130); a closed stdout (``... | head``) exits quietly. Any other
exception is a bug and keeps its traceback. ``MEDTUNE_TRACEBACK=1`` re-raises everything.

Output files: the wrapper cannot know what a failing run had half written, so writers must make
their outputs atomic (``medtune.utils.jsonl.write_jsonl_atomic`` / ``write_text_atomic``: a temp
file then ``os.replace``), or append row by row (``append_jsonl``) where a torn last line is
repaired on the next read.

This module is import-light (no torch): library error types are matched by module and name.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import re
import sys
from collections.abc import Callable, Mapping
from typing import Any

__all__ = [
    "MISSING",
    "ConfigError",
    "UserError",
    "at_least",
    "cfg_get",
    "describe",
    "did_you_mean",
    "in_range",
    "non_negative",
    "one_of",
    "passthrough",
    "positive",
    "run_entry",
]

#: ``cfg_get``'s default meaning "the key is required".
MISSING: Any = object()

_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


def did_you_mean(word: str, candidates) -> str:
    """Return a `` (did you mean 'x'?)`` suffix for the closest candidates, or ``""``.

    Args:
        word: what the user typed.
        candidates: valid names.

    Returns:
        A string starting with a space, naming up to three close matches, or an empty string.
    """
    matches = difflib.get_close_matches(word, sorted(set(candidates)), n=3, cutoff=0.6)
    if not matches:
        return ""
    if len(matches) == 1:
        return f" (did you mean '{matches[0]}'?)"
    return " (did you mean " + " or ".join(f"'{m}'" for m in matches) + "?)"


class UserError(Exception):
    """A problem with the user's input (config, data, files); printed as one line, no traceback."""


class ConfigError(UserError):
    """A bad config value; the message starts with the dotted key: ``batch_size: expected ...``."""


# ----------------------------------------------------------------------------- the entry wrapper


def run_entry(name: str, fn: Callable[[], object]) -> int:
    """Run an entry point under the error policy and return its exit status.

    Args:
        name: the program's name, the prefix of every message (``vision_finetune``).
        fn: the entry point, called without arguments (a ``@config.parse`` function, a ``main``).
            Its return value is the status (None -> 0); a ``SystemExit`` it raises passes through.

    Returns:
        ``fn``'s status; 1 after a user error, 130 after Ctrl-C, 141 when stdout was closed.
    """
    try:
        status = fn()
    except KeyboardInterrupt as e:
        if _passthrough(e):
            raise
        print(f"\n{name}: interrupted", file=sys.stderr, flush=True)
        return _INTERRUPTED
    except BrokenPipeError as e:
        if _passthrough(e) or not _stdout_closed(e):
            raise
        # Point stdout at /dev/null so that the interpreter's last flush does not fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as for a C program killed by the closed pipe
    except Exception as e:
        message = None if _passthrough(e) else describe(e)
        if message is None:
            raise
        sys.stdout.flush()
        print(f"{name}: error: {message}", file=sys.stderr, flush=True)
        return 1
    return int(status or 0)


def _passthrough(e: BaseException) -> bool:
    return bool(os.environ.get("MEDTUNE_TRACEBACK")) or getattr(e, "_medtune_passthrough", False)


@contextlib.contextmanager
def passthrough():
    """Exceptions raised inside pass through an enclosing :func:`run_entry` untouched.

    ``medtune run`` executes a recipe in its own process; the recipe applies its own policy (its
    ``run_entry``), and what escapes it shows as it would under ``python recipe.py``.
    """
    try:
        yield
    except (Exception, KeyboardInterrupt) as e:
        e._medtune_passthrough = True
        raise


def _stdout_closed(e: BrokenPipeError) -> bool:
    """Whether the broken pipe is stdout (not a socket or a child's pipe)."""
    if getattr(e, "filename", None):
        return False
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        return True
    except (OSError, ValueError):
        return False
    try:  # the buffer was empty: ask the kernel whether the reader went away
        import select

        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poller.poll(0))
    except (OSError, ValueError, AttributeError):
        return False


# ----------------------------------------------------------------------------- translation


def describe(exc: BaseException) -> str | None:
    """The one-line message for a user error, or None for a bug (which keeps its traceback).

    User errors are :class:`UserError` and these library errors:

    * YAML that does not parse (``yaml.YAMLError``), with file, line and column;
    * omegaconf's missing key, missing mandatory value (``???``) or unresolved interpolation,
      named by the full key;
    * torchtune's ``InstantiationError`` (a ``_component_`` that does not import), a ``ValueError``
      raised by torchtune's config parser (malformed override, ``~key`` not found), a
      ``TypeError`` from calling a ``_component_`` with an argument it does not take, and
      torchtune's ``ConfigError`` from ``config.validate``;
    * ``safetensors`` header errors (truncated or foreign file), ``torch.load`` refusing a pickle
      under ``weights_only=True`` or a corrupt zip archive, a state dict of other shapes;
    * ``FileNotFoundError`` / ``IsADirectoryError`` / ``NotADirectoryError`` / ``PermissionError``;
    * any of these raised in a DataLoader worker (unwrapped to the original message).
    """
    from medtune.utils import library_errors  # here: it imports UserError from this module

    return library_errors.translate(exc)


# ----------------------------------------------------------------------------- reading config


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
