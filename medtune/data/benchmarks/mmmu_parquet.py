"""MMMU's health subsets in the hub parquet layout (``<Subject>/<split>-*.parquet``).

Sources: the dataset card of ``MMMU/MMMU`` (columns ``id``, ``question``, ``options`` (a Python
list written as a string), ``explanation``, ``image_1`` .. ``image_7`` (``datasets`` Image
structs or null), ``img_type``, ``answer``, ``topic_difficulty``, ``question_type``
(``multiple-choice`` or ``open``), ``subfield``) and MedEvalKit's MMMU code
(``utils/MMMU/data_utils.py``: ``eval(sample['options'])``; the "Health and Medicine" subjects).

Multiple-choice rows become ``task="mcq"`` samples (answer = the letter); ``open`` rows become
VQA samples with ``answer_type="OPEN"`` (kept only with ``question_types`` naming ``open``). The
question keeps MMMU's ``<image k>`` references; the images come in ``image_1..7`` order. The
subject is the ``subset`` group key.
"""

from __future__ import annotations

import ast
from pathlib import Path

from medtune.data.benchmarks._common import (
    answer_letter,
    check_unique,
    embedded_image,
    find_parquet,
    mcq_sample,
    read_parquet_rows,
)
from medtune.data.errors import BadValueError, DataError
from medtune.data.rows import SkipCounter, get_field
from medtune.data.sample import Sample, qa_sample

__all__ = ["MMMU_HEALTH_SUBJECTS", "mmmu"]

MMMU_HEALTH_SUBJECTS = (
    "Basic_Medical_Science",
    "Clinical_Medicine",
    "Diagnostics_and_Laboratory_Medicine",
    "Pharmacy",
    "Public_Health",
)
QUESTION_TYPES = ("multiple-choice", "open")


def _options(value, ctx) -> list[str]:
    if isinstance(value, list):
        opts = value
    else:
        try:
            opts = ast.literal_eval(value) if isinstance(value, str) else None
        except (ValueError, SyntaxError):
            opts = None
    if not isinstance(opts, list) or not all(isinstance(o, str) for o in opts):
        raise BadValueError(
            f"field 'options' is {str(value)[:60]!r} (expected a list of strings, written "
            "\"['...', '...']\")",
            **ctx,
        )
    return opts


def mmmu(
    root: str | Path,
    split: str = "validation",
    subjects: list[str] | str | None = None,
    question_types: list[str] | str = ("multiple-choice",),
    skip_bad_rows: bool = False,
) -> list[Sample]:
    """Read MMMU subjects (default: the five health subjects) from the hub parquet folders.

    Args:
        root: the ``MMMU`` folder holding one folder per subject.
        split: ``dev``, ``validation`` (MedEvalKit's default; answers public) or ``test``.
        subjects: subject folder names; None = :data:`MMMU_HEALTH_SUBJECTS`.
        question_types: which of ``multiple-choice`` / ``open`` to keep.
        skip_bad_rows: count and skip bad rows instead of raising.

    Returns:
        Samples, id = MMMU's ``id``; ``meta``: ``dataset="mmmu_med"``, ``subset`` (subject),
        ``question_type``, ``subfield``, ``img_type``, ``image`` (names); mcq rows add
        ``task="mcq"``, ``choices``, ``answer`` (letter).

    Raises:
        DataError: a missing subject folder, bad ``options``, an answer outside the options, a
            row without images.
    """
    root = Path(root)
    subjects = [subjects] if isinstance(subjects, str) else list(subjects or MMMU_HEALTH_SUBJECTS)
    qtypes = {question_types} if isinstance(question_types, str) else set(question_types)
    if not qtypes <= set(QUESTION_TYPES):
        raise ValueError(
            f"mmmu: question_types {sorted(qtypes)} (expected some of {QUESTION_TYPES})"
        )
    counter = SkipCounter(f"mmmu {split}", skip_bad_rows)
    seen: dict[str, int] = {}
    out: list[Sample] = []
    for subject in subjects:
        for path in find_parquet(root / subject, split):
            for i, row in enumerate(read_parquet_rows(path)):
                try:
                    rid = get_field(row, "id", file=path, index=i)
                    ctx = {"file": path, "row": i, "row_id": rid}
                    fctx = {"file": path, "index": i, "row_id": rid}
                    check_unique(rid, i, seen, ctx)
                    qtype = get_field(row, "question_type", **fctx)
                    if qtype not in QUESTION_TYPES:
                        raise BadValueError(
                            f"question_type {qtype!r} (expected one of {QUESTION_TYPES})", **ctx
                        )
                    if qtype not in qtypes:
                        continue
                    question = get_field(row, "question", **fctx)
                    answer = get_field(row, "answer", **fctx)
                    images, names = [], []
                    for k in range(1, 8):
                        cell = row.get(f"image_{k}")
                        if cell is None:
                            continue
                        image, name = embedded_image(cell, f"image_{k}", ctx)
                        images.append(image)
                        names.append(name or f"{path.name}#{i}/image_{k}")
                    if not images:
                        raise BadValueError("no image in image_1..image_7", **ctx)
                    meta = {
                        "dataset": "mmmu_med",
                        "split": split,
                        "image": names,
                        "language": "en",
                        "subset": subject,
                        "question_type": qtype,
                        **{k: row.get(k) for k in ("subfield", "img_type", "topic_difficulty")},
                    }
                    if qtype == "open":
                        meta.update(question=question, answer=answer, answer_type="OPEN")
                        out.append(qa_sample(rid, images, question, answer, meta))
                        continue
                    choices = _options(row.get("options"), ctx)
                    letter = answer_letter(answer, choices, ctx, "answer")
                    out.append(mcq_sample(rid, images, question, choices, letter, meta))
                except DataError as e:
                    counter.record(e)
    return counter.finish(out)
