"""Errors for bad input data: one class per kind of problem, each message naming file and row.

Every reader raises a :class:`DataError` (a :class:`~medtune.utils.errors.UserError`, so the entry
wrapper prints it as one line; also a :class:`ValueError` for older callers) whose message names
the file, the row (index and id) and what was expected, e.g.::

    /data/Slake1.0/train.json row 17 (qid 1234): missing field 'answer' (expected a string)

Row indices are 0-based positions in the file's JSON list (JSONL: among the non-empty lines).
Subclasses carry a short ``reason`` label ("missing field", "unknown answer_type", "missing image",
...) by which ``skip_bad_rows`` counts them. The row-reading helpers (``load_json``, ``load_rows``,
``get_field``, ``resolve_image``, ``Samples``, ``SkipCounter``) live in :mod:`medtune.data.rows`.

This module is import-light (no torch, no numpy).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medtune.utils.errors import UserError

__all__ = [
    "DataError",
    "MissingFieldError",
    "BadValueError",
    "UnknownAnswerTypeError",
    "MissingImageError",
    "MalformedJSONError",
    "ImageLoadError",
    "NoAnswerError",
]


class DataError(UserError, ValueError):
    """Bad input data. The message names the file, the row (index and id) and the expectation.

    Attributes:
        reason: short label used to count skips (e.g. ``"missing field"``).
        file: the file that holds the bad row, if known.
        row: 0-based row index in that file, if row-level.
        row_id: the row's id (e.g. SLAKE ``qid``), if it has one.
        id_name: what the id is called in the message (``"qid"``, ``"id"``, ``"image_name"``).
    """

    reason = "bad row"

    def __init__(
        self,
        message: str,
        *,
        file: str | Path | None = None,
        row: int | None = None,
        row_id: Any = None,
        id_name: str = "id",
        reason: str | None = None,
    ) -> None:
        self.file = str(file) if file is not None else None
        self.row = row
        self.row_id = row_id
        if reason is not None:
            self.reason = reason
        self.detail = message
        super().__init__(_format(message, file, row, row_id, id_name))


class MissingFieldError(DataError):
    """A required field is absent, or has the wrong type."""

    reason = "missing field"


class BadValueError(DataError):
    """A field holds a value outside the allowed set."""

    reason = "bad value"


class UnknownAnswerTypeError(BadValueError):
    """``answer_type`` is not one of the known values (OPEN / CLOSED)."""

    reason = "unknown answer_type"


class MissingImageError(DataError):
    """The image a row refers to does not exist on disk."""

    reason = "missing image"


class MalformedJSONError(DataError):
    """A JSON file does not parse, or its top level is not what the reader expects."""

    reason = "malformed JSON"


class NoAnswerError(DataError):
    """A training conversation has no assistant turn (nothing to learn from)."""

    reason = "no answer"


class ImageLoadError(DataError):
    """An image could not be opened or decoded. The message names the path and what failed.

    A :class:`DataError`, hence a :class:`ValueError`.
    """

    reason = "unreadable image"


def _format(message: str, file: Any, row: int | None, row_id: Any, id_name: str) -> str:
    label = f"{id_name} {row_id}" if row_id is not None else None
    parts = [str(file)] if file is not None else []
    if row is not None:
        parts.append(f"row {row}")
    prefix = " ".join(parts)
    if label is not None:
        prefix = f"{prefix} ({label})" if prefix else f"({label})"
    return f"{prefix}: {message}" if prefix else message
