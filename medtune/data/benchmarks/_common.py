"""Shared pieces of the benchmark readers: parquet files, embedded images, multiple-choice samples.

Import-light: pyarrow is imported only when a parquet file is read.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from medtune.data.errors import BadValueError, DataError, MissingFieldError, MissingImageError
from medtune.data.sample import Sample, qa_sample

__all__ = [
    "LETTERS",
    "check_unique",
    "embedded_image",
    "find_parquet",
    "mcq_sample",
    "read_parquet_rows",
]

#: Option letters in order; MedXpertQA MM has 5 options, MMMU up to 9 (A..I).
LETTERS = "ABCDEFGHIJ"


def find_parquet(root: str | Path, split: str) -> list[Path]:
    """The parquet shards of ``split`` in a Hugging Face dataset folder.

    Accepts a parquet file itself, a folder with ``data/<split>-*.parquet`` (the hub layout of
    ``flaviagiammarino/path-vqa`` and ``flaviagiammarino/vqa-rad``), ``<split>-*.parquet`` or
    ``<split>/*.parquet``.

    Raises:
        DataError: nothing matches (names the folder and the patterns tried).
    """
    root = Path(root)
    if root.is_file():
        return [root]
    patterns = (f"data/{split}-*.parquet", f"{split}-*.parquet", f"{split}/*.parquet")
    for pat in patterns:
        found = sorted(root.glob(pat))
        if found:
            return found
    raise DataError(
        f"{root}: no parquet file for split {split!r} (looked for {', '.join(patterns)})",
        reason="missing file",
    )


def read_parquet_rows(path: Path) -> list[dict[str, Any]]:
    """All rows of one parquet file as dicts (image structs stay ``{"bytes", "path"}``).

    Raises:
        DataError: pyarrow cannot read the file (names it).
    """
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except (OSError, ValueError) as e:  # pyarrow.ArrowInvalid is a ValueError
        raise DataError(
            f"{path}: not a readable parquet file ({e})", reason="malformed file"
        ) from None


def embedded_image(value: Any, field: str, ctx: dict[str, Any]):
    """A parquet image cell (the ``datasets`` Image feature: ``{"bytes": ..., "path": ...}`` or raw
    bytes) -> ``(PIL image, name)``. The image is opened lazily (decoded when first used).

    Raises:
        MissingImageError: the cell holds no bytes.
        DataError: the bytes are not an image PIL can open.
    """
    from PIL import Image, UnidentifiedImageError

    name = None
    if isinstance(value, dict):
        name = value.get("path")
        value = value.get("bytes")
    if not isinstance(value, (bytes, bytearray)) or not value:
        raise MissingImageError(
            f"field {field!r} holds no image bytes (expected the datasets Image struct "
            "{'bytes': ..., 'path': ...})",
            **ctx,
        )
    try:
        image = Image.open(io.BytesIO(value))
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(
            f"field {field!r}: not an image ({e})", reason="unreadable image", **ctx
        ) from None
    return image, name


def check_unique(sid: str, i: int, seen: dict[str, int], ctx: dict[str, Any]) -> None:
    """Refuse a second row with id ``sid`` (eval resumes by id)."""
    if sid in seen:
        raise BadValueError(f"duplicate id (first at row {seen[sid]}; expected unique ids)", **ctx)
    seen[sid] = i


def answer_letter(answer: Any, choices: list[str], ctx: dict[str, Any], field: str) -> str:
    """The answer as an upper-case option letter within the choices.

    Raises:
        MissingFieldError: not a string.
        BadValueError: not one of the letters of the choices.
    """
    if not isinstance(answer, str):
        raise MissingFieldError(
            f"field {field!r} is {type(answer).__name__} (expected a letter)", **ctx
        )
    letter = answer.strip().rstrip(".").upper()
    allowed = LETTERS[: len(choices)]
    if len(letter) != 1 or letter not in allowed:
        raise BadValueError(
            f"field {field!r} is {answer!r} (expected one of {', '.join(allowed)})", **ctx
        )
    return letter


def mcq_sample(
    sid: str,
    images: list[Any],
    question: str,
    choices: list[str],
    letter: str,
    meta: dict[str, Any],
) -> Sample:
    """One multiple-choice question: the user turn is the bare question, the target the letter.

    ``meta`` gets ``task="mcq"``, ``question``, ``choices`` (option texts, A first) and
    ``answer`` (the letter); eval builds the prompt (:func:`medtune.eval.mcq.mcq_prompt`).
    """
    meta = {**meta, "task": "mcq", "question": question, "choices": list(choices), "answer": letter}
    return qa_sample(sid, images, question, letter, meta)
