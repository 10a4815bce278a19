"""Reading rows: JSON / JSONL files, checked fields and image paths, and ``skip_bad_rows``.

With ``skip_bad_rows=True`` a reader catches row-level :class:`~medtune.data.errors.DataError` s,
counts them by ``reason`` and returns a :class:`Samples` list whose :attr:`Samples.skipped` holds
the counts; a one-line summary is logged (WARNING when anything was skipped, so it shows without
logging set up) at the end. File-level problems (a missing file, malformed JSON, a top level that
is not a list) are never skipped: they always raise.

This module is import-light (no torch, no numpy).
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any

from medtune.data.errors import DataError, MalformedJSONError, MissingFieldError, MissingImageError

logger = logging.getLogger("medtune.data")

__all__ = [
    "Samples",
    "SkipCounter",
    "get_field",
    "load_json",
    "load_rows",
    "optional_id",
    "resolve_image",
]


def load_json(path: str | Path) -> Any:
    """Read a JSON file; a parse error names the file, line and column.

    Raises:
        DataError: the file does not exist.
        MalformedJSONError: the file is not valid JSON (message has line and column).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"file not found: {path}", reason="missing file")
    try:
        with open(path, encoding="utf-8-sig") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise MalformedJSONError(
            f"malformed JSON at line {e.lineno} column {e.colno}: {e.msg}", file=path
        ) from None
    except UnicodeDecodeError as e:
        raise MalformedJSONError(
            f"not UTF-8 text ({e.reason} at byte {e.start})", file=path
        ) from None


class Samples(list):
    """A ``list[Sample]`` that also records what a reader skipped.

    Attributes:
        skipped: ``Counter`` of skipped rows by reason (empty unless ``skip_bad_rows=True`` found
            bad rows). ``sum(samples.skipped.values())`` is the number of skipped rows.
        source: a short description of what was read (e.g. ``"slake test.json"``).
        errors: the individual :class:`DataError` s that caused the skips, in order.
    """

    def __init__(self, items=(), *, source: str = "", skipped: Counter | None = None, errors=None):
        super().__init__(items)
        self.source = source
        self.skipped: Counter = Counter(skipped or {})
        self.errors: list[DataError] = list(errors or [])

    @property
    def num_skipped(self) -> int:
        """Total number of skipped rows."""
        return sum(self.skipped.values())

    def summary(self) -> str:
        """One line, e.g. ``slake test.json: kept 1061, skipped 2 (missing image: 1, ...)``."""
        text = f"{self.source}: kept {len(self)}, skipped {self.num_skipped}"
        if self.skipped:
            text += " (" + ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items())) + ")"
        return text


class SkipCounter:
    """Collects row errors for a reader: raises them, or counts them when skipping is on.

    Use ``with counter.row():`` around the handling of one row; a :class:`DataError` raised inside
    is re-raised (``skip=False``) or recorded (``skip=True``) and the row is dropped. Then
    :meth:`finish` wraps the kept samples in :class:`Samples` and logs the summary.
    """

    def __init__(self, source: str, skip: bool) -> None:
        self.source = source
        self.skip = skip
        self.skipped: Counter = Counter()
        self.errors: list[DataError] = []

    def record(self, err: DataError) -> None:
        """Count ``err`` if skipping, else raise it."""
        if not self.skip:
            raise err
        self.skipped[err.reason] += 1
        self.errors.append(err)
        logger.debug("skipping: %s", err)

    def finish(self, samples: list) -> Samples:
        """Wrap ``samples`` and log the one-line summary (when skipping is on)."""
        out = Samples(samples, source=self.source, skipped=self.skipped, errors=self.errors)
        if self.skip:
            level = logging.WARNING if out.skipped else logging.INFO
            logger.log(level, out.summary())
        return out


# ------------------------------------------------------------------------------ row field helpers


def get_field(
    row: Any,
    name: str,
    *,
    file: str | Path,
    index: int,
    row_id: Any = None,
    id_name: str = "id",
    types: tuple[type, ...] = (str,),
    expected: str = "a string",
    required: bool = True,
) -> Any:
    """``row[name]`` checked for presence and type; raises :class:`MissingFieldError` naming the row.

    ``bool`` never passes as ``int``. A missing optional field returns ``None``.
    """
    if not isinstance(row, dict):
        raise MissingFieldError(
            f"row is {type(row).__name__}, expected an object with field {name!r}",
            file=file,
            row=index,
            row_id=row_id,
            id_name=id_name,
        )
    value = row.get(name)
    if value is None:
        if not required:
            return None
        raise MissingFieldError(
            f"missing field {name!r} (expected {expected})",
            file=file,
            row=index,
            row_id=row_id,
            id_name=id_name,
        )
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        shown = repr(value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise MissingFieldError(
            f"field {name!r} is {type(value).__name__} {shown} (expected {expected})",
            file=file,
            row=index,
            row_id=row_id,
            id_name=id_name,
        )
    return value


def optional_id(row: Any, path: str | Path, index: int, name: str = "id") -> Any:
    """The row's optional string or integer id field ``name`` (None when absent)."""
    return get_field(
        row,
        name,
        file=path,
        index=index,
        types=(str, int),
        expected="a string or integer id",
        required=False,
    )


def resolve_image(
    image_root: str | Path,
    rel: str,
    *,
    file: str | Path,
    index: int,
    row_id: Any = None,
    id_name: str = "id",
    field: str = "image",
) -> str:
    """Absolute path of ``image_root / rel``; raises :class:`MissingImageError` if it does not exist."""
    path = os.path.abspath(os.path.join(os.fspath(image_root), rel))
    if not os.path.exists(path):
        raise MissingImageError(
            f"image not found: {path} (field {field!r} = {rel!r}; expected a file under {image_root})",
            file=file,
            row=index,
            row_id=row_id,
            id_name=id_name,
        )
    return path


def load_rows(path: str | Path) -> list:
    """A JSON list of rows, or a JSONL file (one JSON object per non-empty line).

    Raises:
        DataError: the file does not exist.
        MalformedJSONError: a parse error (JSONL: names the line), or a JSON top level that is not
            a list.
    """
    path = Path(path)
    if path.suffix.lower() != ".jsonl":
        data = load_json(path)
        if not isinstance(data, list):
            raise MalformedJSONError(
                f"top level is {type(data).__name__}, expected a list of rows", file=path
            )
        return data
    if not path.is_file():
        raise DataError(f"file not found: {path}", reason="missing file")
    rows = []
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise MalformedJSONError(
                    f"malformed JSON at line {lineno} column {e.colno}: {e.msg}", file=path
                ) from None
    return rows
