"""MedXpertQA MM: ``MM/{dev,test}.jsonl`` with an ``options`` object and an ``images`` list.

Sources: the dataset card of ``TsinghuaC3I/MedXpertQA`` (config ``MM``; fields ``id``,
``question``, ``options`` {letter: text, A-E}, ``label``, ``images`` (file names under the
release's ``images/``), ``medical_task``, ``body_system``, ``question_type``) and MedEvalKit's
loader ``utils/MedXpertQA/MedXpertQA.py`` (choices ``"A. text"`` in the ``options`` order,
images from ``<root>/images/<name>``; several images per question).

``medical_task``, ``body_system`` and ``question_type`` are kept for per-group tables.
"""

from __future__ import annotations

from pathlib import Path

from medtune.data.benchmarks._common import LETTERS, answer_letter, check_unique, mcq_sample
from medtune.data.errors import BadValueError, DataError, MissingFieldError
from medtune.data.rows import SkipCounter, get_field, load_rows, resolve_image
from medtune.data.sample import Sample

__all__ = ["medxpertqa"]


def medxpertqa(
    root: str | Path,
    split: str = "test",
    subset: str = "MM",
    skip_bad_rows: bool = False,
) -> list[Sample]:
    """Read MedXpertQA (the MM subset by default) as multiple-choice samples.

    Args:
        root: the release folder holding ``MM/<split>.jsonl`` and ``images/``, or a jsonl file
            (images then in ``images/`` beside its folder).
        split: ``test`` or ``dev``.
        subset: ``MM`` (images) or ``Text`` (no images).
        skip_bad_rows: count and skip bad rows instead of raising.

    Returns:
        Samples, id = the row's ``id``; ``meta``: ``dataset="medxpertqa_mm"`` (``_text`` for the
        Text subset), ``task="mcq"``, ``choices`` (texts in the options' letter order),
        ``answer`` (``label``), ``image`` (the list of names), ``medical_task``, ``body_system``,
        ``question_type``.

    Raises:
        DataError: a missing file, a row without a field, options that are not letters A..,
            a label not among them, a missing image.
    """
    root = Path(root)
    path = root if root.is_file() else root / subset / f"{split}.jsonl"
    base = path.parent.parent if root.is_file() else root
    rows = load_rows(path)
    name = f"medxpertqa_{subset.lower()}"
    counter = SkipCounter(f"{name} {path.name}", skip_bad_rows)
    seen: dict[str, int] = {}
    out: list[Sample] = []
    for i, row in enumerate(rows):
        try:
            rid = get_field(row, "id", file=path, index=i, types=(str, int), expected="an id")
            ctx = {"file": path, "row": i, "row_id": rid}
            fctx = {"file": path, "index": i, "row_id": rid}
            check_unique(str(rid), i, seen, ctx)
            question = get_field(row, "question", **fctx)
            options = get_field(
                row, "options", **fctx, types=(dict,), expected="an object {A: text, ...}"
            )
            keys = sorted(options)
            if keys != list(LETTERS[: len(keys)]) or len(keys) < 2:
                raise BadValueError(f"options keys {keys} (expected A, B, ... in sequence)", **ctx)
            choices = []
            for k in keys:
                if not isinstance(options[k], str):
                    raise MissingFieldError(
                        f"option {k} is {type(options[k]).__name__} (expected text)", **ctx
                    )
                choices.append(options[k])
            letter = answer_letter(get_field(row, "label", **fctx), choices, ctx, "label")
            names = row.get("images") or []
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise MissingFieldError("field 'images' is not a list of file names", **ctx)
            if subset == "MM" and not names:
                raise MissingFieldError(
                    "no images (expected a non-empty 'images' list in MM)", **ctx
                )
            images = [resolve_image(base / "images", n, **fctx, field="images") for n in names]
            meta = {
                "dataset": name,
                "split": split,
                "image": list(names),
                "language": "en",
                **{k: row.get(k) for k in ("medical_task", "body_system", "question_type")},
            }
            out.append(mcq_sample(str(rid), images, question, choices, letter, meta))
        except DataError as e:
            counter.record(e)
    return counter.finish(out)
