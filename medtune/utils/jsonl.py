"""The one JSONL module: read (with torn-last-line repair), append (flushed), atomic write.

Predictions, prompts, descriptions and verdicts are JSON Lines files: one object per line, written
row by row so that a killed run loses at most the row being written. What such a kill leaves is a
last line without its newline that is not valid JSON; :func:`read_jsonl` drops it (and with
``repair=True`` cuts it from the file, so appending continues on a clean line). Any other bad line
is the user's problem and is reported as ``file:line: ...`` (a :class:`JsonlError`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import IO, Any

from medtune.utils.errors import UserError

__all__ = [
    "JsonlError",
    "append_jsonl",
    "read_jsonl",
    "read_jsonl_numbered",
    "write_jsonl_atomic",
    "write_text_atomic",
]


class JsonlError(UserError, ValueError):
    """A JSONL file holds a line that is not a JSON object; the message names file and line."""


def dumps(row: Mapping[str, Any]) -> str:
    """One row as one JSON line (UTF-8 kept as is, no trailing newline)."""
    return json.dumps(row, ensure_ascii=False)


def read_jsonl(
    path: str | os.PathLike, *, repair: bool = False, what: str = "rows", strict: bool = False
) -> list[dict[str, Any]]:
    """Read a JSONL file: one dict per non-blank line, in file order.

    Args:
        path: the file.
        repair: cut a torn last line (no newline, not valid JSON) from the file itself, and add
            the missing newline after a valid last line, so that the next append starts a line.
        what: what the rows are (``"predictions"``, ``"verdicts"``), for the error message.
        strict: a torn last line is an error too (reading a file that should be complete, such
            as predictions to score), not dropped.

    Returns:
        The rows.

    Raises:
        FileNotFoundError: the file does not exist.
        JsonlError: a line that is not a JSON object (other than a torn last line), or text that
            is not UTF-8; the message names ``path:line``.
    """
    return [row for _, row in read_jsonl_numbered(path, repair=repair, what=what, strict=strict)]


def read_jsonl_numbered(
    path: str | os.PathLike, *, repair: bool = False, what: str = "rows", strict: bool = False
) -> list[tuple[int, dict[str, Any]]]:
    """:func:`read_jsonl` with each row's 1-based line number, for callers' own messages."""
    data = Path(path).read_bytes()
    lines = data.split(b"\n")  # the piece after the last newline is the unterminated tail
    tail = lines.pop()
    rows: list[tuple[int, dict[str, Any]]] = []

    def parse(raw: bytes, lineno: int, torn_ok: bool) -> bool:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            if torn_ok:
                return False
            raise JsonlError(
                f"{path}:{lineno}: not UTF-8 text ({e.reason}); expected {what} as JSON lines"
            ) from None
        if not text.strip():
            return True
        try:
            row = json.loads(text)
        except json.JSONDecodeError as e:
            if torn_ok:
                return False
            raise JsonlError(
                f"{path}:{lineno}: not valid JSON ({e.msg}); expected one JSON object of {what} per line"
            ) from None
        if not isinstance(row, dict):
            raise JsonlError(
                f"{path}:{lineno}: expected a JSON object of {what}, got {type(row).__name__}"
            )
        rows.append((lineno, row))
        return True

    for lineno, raw in enumerate(lines, start=1):
        parse(raw, lineno, torn_ok=False)
    if tail:
        kept = parse(tail, len(lines) + 1, torn_ok=not strict)
        if repair:
            with open(path, "r+b") as fh:
                if kept:
                    fh.seek(0, os.SEEK_END)
                    fh.write(b"\n")
                else:  # a killed writer's half line: drop it, its row is produced again
                    fh.truncate(len(data) - len(tail))
    return rows


def append_jsonl(fh_or_path: IO[str] | str | os.PathLike, row: Mapping[str, Any]) -> None:
    """Append one row as one line and flush it.

    Args:
        fh_or_path: a text file open for appending (kept open: the caller writes many rows), or a
            path (opened, appended to and closed).
        row: a JSON-able mapping.
    """
    line = dumps(row) + "\n"  # serialise first: a row that is not JSON-able writes nothing
    if isinstance(fh_or_path, (str, os.PathLike)):
        with open(fh_or_path, "a", encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()
        return
    fh_or_path.write(line)
    fh_or_path.flush()


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace``.

    A reader (or a killed run) sees the old file or the new one, never half of it. The folder is
    created when missing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_jsonl_atomic(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]]) -> None:
    """Write ``rows`` as a JSONL file atomically (see :func:`write_text_atomic`)."""
    write_text_atomic(path, "".join(dumps(r) + "\n" for r in rows))
