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

This module is import-light (no torch): library error types are matched by module and name
(:mod:`medtune.utils.library_errors`). The config reader ``cfg_get`` and its checks live in
:mod:`medtune.utils.config`.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import sys
from collections.abc import Callable

from medtune.utils import library_errors

__all__ = [
    "ConfigError",
    "UserError",
    "describe",
    "did_you_mean",
    "passthrough",
    "run_entry",
]

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
    return library_errors.translate(exc)
