"""The verdict cache: an append-only ``verdicts.jsonl`` keyed by (judge, prompt hash, row key).

Built on :mod:`medtune.utils.jsonl`: every verdict is one appended, flushed line; a torn last line
(a killed writer) is cut off on open; :meth:`VerdictStore.compact` rewrites the file atomically.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from medtune.utils.errors import UserError
from medtune.utils.jsonl import JsonlError, append_jsonl, read_jsonl_numbered, write_jsonl_atomic


def row_key(row: Mapping[str, Any]) -> str:
    """The cache key of a predictions row: ``checkpoint|dataset|split|id``.

    The id alone is only unique within a dataset, and the same question appears once per
    checkpoint when several predictions files are judged together.
    """
    return "|".join(str(row.get(k, "")) for k in ("checkpoint", "dataset", "split", "id"))


def input_sha256(text: str) -> str:
    """SHA-256 (hex) of a rendered prompt: a cached verdict is reused only for the same input."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class VerdictsFileError(UserError, ValueError):
    """``verdicts.jsonl`` holds a line that is not a verdict row (names file and line)."""


class VerdictStore:
    """Append-only ``verdicts.jsonl``, keyed by (judge, prompt_sha256, key); last row wins.

    Every :meth:`append` writes one JSON line and flushes it, so a killed run loses at most the
    verdict being written. On open, a torn last line (no newline) is cut off. :meth:`compact`
    rewrites the file with exactly one row per cache key (atomically, via a temporary file).

    Args:
        path: the JSONL file (created with its folder if missing).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._rows: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.n_lines = 0
        self._load()
        self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    @staticmethod
    def cache_key(row: Mapping[str, Any]) -> tuple[str, str, str]:
        """(judge, prompt_sha256, key) of a verdict row."""
        return (str(row["judge"]), str(row["prompt_sha256"]), str(row["key"]))

    def _load(self) -> None:
        if not self.path.exists():
            return
        try:  # a torn last line (a killed writer) is cut off: its verdict is judged again
            numbered = read_jsonl_numbered(self.path, repair=True, what="verdict rows")
        except JsonlError as e:  # "<path>:<line>: <reason>"
            line, _, reason = str(e).removeprefix(f"{self.path}:").partition(": ")
            raise VerdictsFileError(
                f"{self.path}:{line}: not a verdict row ({reason}); move the file away to start over"
            ) from None
        for lineno, row in numbered:
            try:
                key = self.cache_key(row)
            except KeyError as e:
                raise VerdictsFileError(
                    f"{self.path}:{lineno}: not a verdict row (no {e}); move the file away to "
                    "start over"
                ) from None
            self._rows[key] = row
            self.n_lines += 1

    def get(self, judge: str, prompt_hash: str, key: str) -> dict[str, Any] | None:
        """The cached verdict row, or None."""
        return self._rows.get((judge, prompt_hash, key))

    def append(self, row: Mapping[str, Any]) -> None:
        """Write one verdict row and flush it."""
        row = dict(row)
        append_jsonl(self._fh, row)
        self._rows[self.cache_key(row)] = row
        self.n_lines += 1

    def compact(self) -> None:
        """Rewrite the file with one row per cache key, if it holds superseded rows."""
        if self.n_lines == len(self._rows):
            return
        self._fh.close()
        write_jsonl_atomic(self.path, self._rows.values())
        self.n_lines = len(self._rows)
        self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115

    def close(self) -> None:
        """Flush to disk and close the file."""
        if not self._fh.closed:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()

    def __enter__(self) -> VerdictStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
