"""The predictions JSONL: write, read and validate rows.

One JSON object per line, one line per question. medtune's own writers (``eval``) write every key
of :data:`REQUIRED_KEYS`:

- ``id``: question id, unique within its dataset (str or int)
- ``dataset``: e.g. ``slake``, ``vqa_rad``
- ``split``: e.g. ``test``
- ``image``: image path (str) or list of paths, relative to the dataset root
- ``question``: the question text
- ``answer``: the reference answer (str; numbers are accepted, VQA-RAD has some)
- ``answer_type``: ``CLOSED`` or ``OPEN`` (scorers strip and upper-case it)
- ``prediction``: the model's answer text
- ``checkpoint``: which checkpoint produced it (path or name)
- ``generation``: dict of generation settings (max_new_tokens, temperature, prompt mode, ...)

Optional: ``language``, ``modality``, ``content_type`` and any other metadata (kept as is).

Readers (``medtune score``, ``vqa_judge``) need only :data:`SCORED_KEYS`, the fields they read,
so that predictions made by another system can be scored: ``dataset`` defaults to ``unknown``;
the other keys, when present, must have the types above; anything else is carried through.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import IO, Any

from medtune.utils.errors import UserError
from medtune.utils.jsonl import JsonlError, append_jsonl, read_jsonl_numbered

REQUIRED_KEYS = (
    "id",
    "dataset",
    "split",
    "image",
    "question",
    "answer",
    "answer_type",
    "prediction",
    "checkpoint",
    "generation",
)
#: What scoring and the judge read; a file from another system needs only these.
SCORED_KEYS = ("id", "question", "answer", "answer_type", "prediction")
OPTIONAL_KEYS = ("language", "modality", "content_type")
DEFAULT_DATASET = "unknown"


class PredictionsError(UserError, ValueError):
    """A predictions file or row does not follow the schema; the message names file and line."""


def _where(path: str | os.PathLike | None, line: int | None) -> str:
    where = str(path) if path is not None else "<row>"
    return f"{where}:{line}" if line is not None else where


def validate_row(
    row: Any,
    path: str | os.PathLike | None = None,
    line: int | None = None,
    *,
    required: tuple[str, ...] = REQUIRED_KEYS,
) -> dict[str, Any]:
    """Check one predictions row against the schema.

    Args:
        row: the decoded JSON value.
        path: file name for the error message.
        line: 1-based line number for the error message.
        required: the keys that must be present (:data:`REQUIRED_KEYS` for medtune's writers,
            :data:`SCORED_KEYS` for readers); keys present but not required are type-checked too.

    Returns:
        The row (unchanged).

    Raises:
        PredictionsError: naming ``path:line`` and the missing key or wrong type.
    """
    where = _where(path, line)
    if not isinstance(row, Mapping):
        raise PredictionsError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    missing = [k for k in required if k not in row]
    if missing:
        raise PredictionsError(f"{where}: missing key(s) {', '.join(repr(k) for k in missing)}")
    if not isinstance(row["id"], (str, int)) or isinstance(row["id"], bool):
        raise PredictionsError(f"{where}: 'id' must be a string or integer")
    for key in ("dataset", "split", "question", "answer_type", "prediction", "checkpoint"):
        if key in row and not isinstance(row[key], str):
            raise PredictionsError(
                f"{where}: {key!r} must be a string, got {type(row[key]).__name__}"
            )
    answer = row["answer"]
    if not isinstance(answer, (str, int, float)) or isinstance(answer, bool):
        raise PredictionsError(
            f"{where}: 'answer' must be a string or number, got {type(answer).__name__}"
        )
    image = row.get("image", "")
    if not (
        isinstance(image, str)
        or (isinstance(image, list) and all(isinstance(i, str) for i in image))
    ):
        raise PredictionsError(f"{where}: 'image' must be a path string or a list of them")
    if "generation" in row and not isinstance(row["generation"], Mapping):
        raise PredictionsError(f"{where}: 'generation' must be an object (dict of settings)")
    return dict(row) if not isinstance(row, dict) else row


def write_prediction(fh: IO[str], row: Mapping[str, Any]) -> None:
    """Validate one row (every key of :data:`REQUIRED_KEYS`) and append it as one line, flushed.

    Args:
        fh: a text file opened for writing or appending.
        row: the predictions row.

    Raises:
        PredictionsError: when the row does not follow the schema (nothing is written).
    """
    append_jsonl(fh, validate_row(row, getattr(fh, "name", None)))


def read_predictions(
    path: str | os.PathLike,
    validate: bool = True,
    skip_truncated_tail: bool = False,
    *,
    repair: bool = False,
) -> list[dict[str, Any]]:
    """Read a predictions JSONL file (:func:`medtune.utils.jsonl.read_jsonl`).

    Blank lines are skipped. A last line without its newline (a killed writer) is still read if it
    is valid JSON. Rows without ``dataset`` get ``"unknown"``.

    Args:
        path: the file.
        validate: check every row with :func:`validate_row` against :data:`SCORED_KEYS`.
        skip_truncated_tail: drop a last line that has no newline and is not valid JSON (what a
            killed writer leaves; for resuming) instead of raising.
        repair: with ``skip_truncated_tail``, also cut that line from the file.

    Returns:
        The rows in file order.

    Raises:
        FileNotFoundError: the file does not exist.
        PredictionsError: a line is not JSON or a row breaks the schema (names file and line).
    """
    try:
        numbered = read_jsonl_numbered(
            path, what="predictions", strict=not skip_truncated_tail, repair=repair
        )
    except JsonlError as e:
        raise PredictionsError(str(e)) from None
    for n, row in numbered:
        if validate:
            validate_row(row, path, n, required=SCORED_KEYS)
        row.setdefault("dataset", DEFAULT_DATASET)
    return [row for _, row in numbered]
