"""Errors a user can act on, and close-match suggestions.

Raise :class:`CLIError` anywhere in a subcommand: :func:`medtune._cli.main.main` prints it as a
single ``medtune: error: ...`` line on stderr and exits with status 1, without a traceback.
"""

from __future__ import annotations

from medtune.utils.errors import UserError, did_you_mean

__all__ = ["CLIError", "did_you_mean"]


class CLIError(UserError):
    """A problem with the user's command line or files, reported as one line (no traceback)."""
