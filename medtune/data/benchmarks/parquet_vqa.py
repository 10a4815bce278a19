"""PathVQA and VQA-RAD in their Hugging Face parquet layouts (``image`` bytes, ``question``, ``answer``).

Sources (dataset cards and the loader MedEvalKit uses, ``utils/PATH_VQA/PATH_VQA.py`` and
``utils/VQA_RAD/VQA_RAD.py`` of alibaba-damo-academy/MedEvalKit, ``load_dataset(path, split="test")``):

- ``flaviagiammarino/path-vqa``: ``data/{train,validation,test}-*.parquet``, columns ``image``
  (the ``datasets`` Image struct ``{bytes, path}``), ``question``, ``answer``;
- ``flaviagiammarino/vqa-rad``: ``data/{train,test}-*.parquet``, the same three columns.

Neither has an answer type: as MedEvalKit does, a row whose lower-cased, stripped answer is
``yes`` or ``no`` is ``CLOSED``, any other ``OPEN``. Ids are ``<dataset>-<split>-<row>`` (row =
position over the split's shards in name order). SLAKE's hub copy (``BoKelvin/SLAKE``) is the
``Slake1.0`` layout (``{train,validation,test}.json`` + ``imgs/``): read it with
:func:`medtune.data.slake`.
"""

from __future__ import annotations

from pathlib import Path

from medtune.data.benchmarks._common import (
    check_unique,
    embedded_image,
    find_parquet,
    read_parquet_rows,
)
from medtune.data.errors import DataError
from medtune.data.rows import SkipCounter, get_field
from medtune.data.sample import Sample, qa_sample

__all__ = ["hf_vqa_parquet", "pathvqa", "vqa_rad_hf"]

_ANSWER = (str, int, float)


def hf_vqa_parquet(
    root: str | Path,
    split: str = "test",
    dataset: str = "pathvqa",
    answer_types: list[str] | str | None = None,
    skip_bad_rows: bool = False,
) -> list[Sample]:
    """Read a ``image, question, answer`` parquet split (PathVQA / VQA-RAD hub layout).

    Args:
        root: the dataset folder (holding ``data/<split>-*.parquet``) or one parquet file.
        split: the split name in the file names (``train``, ``validation``, ``test``).
        dataset: the ``meta["dataset"]`` name and id prefix.
        answer_types: keep only ``CLOSED`` and/or ``OPEN`` rows (any case); None keeps all.
        skip_bad_rows: count and skip bad rows instead of raising.

    Returns:
        :class:`~medtune.data.rows.Samples`; ``Sample.images`` holds one lazily decoded PIL image;
        ``meta``: ``dataset``, ``split``, ``question``, ``answer`` (str), ``answer_type``,
        ``image`` (the struct's ``path`` or ``<file>#<row>``), ``language="en"``, ``row``.

    Raises:
        DataError: a missing file, a row without a string ``question``, an ``answer`` that is not
            a string or number, an image cell without bytes (naming file, row and field).
    """
    want = None
    if answer_types is not None:
        want = {
            a.strip().upper()
            for a in ([answer_types] if isinstance(answer_types, str) else answer_types)
        }
        if not want <= {"OPEN", "CLOSED"}:
            raise ValueError(f"answer_types: {sorted(want)} (expected OPEN and/or CLOSED)")
    counter = SkipCounter(f"{dataset} {split}", skip_bad_rows)
    out: list[Sample] = []
    seen: dict[str, int] = {}
    n = 0
    for path in find_parquet(root, split):
        for i, row in enumerate(read_parquet_rows(path)):
            sid = f"{dataset}-{split}-{n}"
            n += 1
            ctx = {"file": path, "row": i}
            fctx = {"file": path, "index": i}
            try:
                check_unique(sid, i, seen, ctx)
                question = get_field(row, "question", **fctx)
                answer = get_field(
                    row, "answer", **fctx, types=_ANSWER, expected="a string or number"
                )
                answer = answer.strip() if isinstance(answer, str) else str(answer)
                answer_type = "CLOSED" if answer.lower() in ("yes", "no") else "OPEN"
                if want is not None and answer_type not in want:
                    continue
                if "image" not in row:
                    get_field(row, "image", **fctx, types=(dict, bytes), expected="an image struct")
                image, name = embedded_image(row["image"], "image", ctx)
                meta = {
                    "dataset": dataset,
                    "split": split,
                    "question": question,
                    "answer": answer,
                    "answer_type": answer_type,
                    "image": name or f"{path.name}#{i}",
                    "language": "en",
                    "row": n - 1,
                }
                out.append(qa_sample(sid, [image], question, answer, meta))
            except DataError as e:
                counter.record(e)
    return counter.finish(out)


def pathvqa(root: str | Path, split: str = "test", **kwargs) -> list[Sample]:
    """PathVQA (``flaviagiammarino/path-vqa``): :func:`hf_vqa_parquet` with ``dataset="pathvqa"``."""
    return hf_vqa_parquet(root, split, dataset="pathvqa", **kwargs)


def vqa_rad_hf(root: str | Path, split: str = "test", **kwargs) -> list[Sample]:
    """VQA-RAD's hub copy (``flaviagiammarino/vqa-rad``): :func:`hf_vqa_parquet` with
    ``dataset="vqa_rad"`` (the OSF release folder is :func:`medtune.data.vqa_rad`)."""
    return hf_vqa_parquet(root, split, dataset="vqa_rad", **kwargs)
