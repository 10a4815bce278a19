"""Errors a user can act on, and close-match suggestions.

Raise :class:`CLIError` anywhere in a subcommand: :func:`medtune._cli.main.main` prints it as a
single ``medtune: error: ...`` line on stderr and exits with status 1, without a traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

from medtune.utils.errors import UserError


class CLIError(UserError):
    """A problem with the user's command line or files, reported as one line (no traceback)."""


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
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
