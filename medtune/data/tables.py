"""CSV tables as the public datasets ship them (plain or ``.csv.gz``), with named errors.

Row numbers in errors are 0-based positions among the data rows (the header is not a row), as
for the JSON readers: without quoted line breaks, row N is line N + 2 of the file.

Import-light: standard library only.
"""

from __future__ import annotations

import csv
import gzip
import io
from pathlib import Path

from medtune.data.errors import DataError, MalformedJSONError

__all__ = ["MalformedCSVError", "find_table", "read_csv_rows"]


class MalformedCSVError(MalformedJSONError):
    """A CSV file lacks a column, or a row does not parse."""

    reason = "malformed CSV"


def find_table(root: Path, name: str, what: str) -> Path:
    """``root/name`` or ``root/name.gz``, whichever exists.

    Raises:
        DataError: neither exists; the message names both and ``what`` the file is.
    """
    for candidate in (root / name, root / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise DataError(
        f"file not found: {root / name} (nor {name}.gz); expected {what}", reason="missing file"
    )


def read_csv_rows(path: Path, required: tuple[str, ...], what: str) -> list[dict[str, str]]:
    """All rows of a CSV file as dicts (values stripped; missing cells are ``""``).

    Args:
        path: the file (``.gz`` is decompressed).
        required: columns that must be in the header.
        what: what the file is, for messages (``"the ChestX-ray14 label table"``).

    Raises:
        DataError: the file does not exist.
        MalformedCSVError: a required column is missing, or the file is not UTF-8 CSV.
    """
    if not path.is_file():
        raise DataError(f"file not found: {path} (expected {what})", reason="missing file")
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        text = raw.decode("utf-8-sig")
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise MalformedCSVError(
            f"cannot read as UTF-8 CSV ({e}); expected {what}", file=path
        ) from None
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in required if c not in header]
        if missing:
            raise MalformedCSVError(
                f"missing column(s) {', '.join(repr(c) for c in missing)} (expected {what} with "
                f"columns {', '.join(required)}; the header has {header})",
                file=path,
            )
        reader.fieldnames = header
        return [{k: (v or "").strip() for k, v in row.items() if k is not None} for row in reader]
    except csv.Error as e:
        raise MalformedCSVError(f"not valid CSV ({e})", file=path) from None
