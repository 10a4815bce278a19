"""PMC-VQA: the csv metafiles with ``Question, Choice A..D, Answer`` and an images folder.

Sources: the dataset card of ``xmcmic/PMC-VQA`` (version 1: ``train.csv`` / ``test.csv`` /
``test_clean.csv`` with ``Figure_path, Question, Answer, Choice A..D, Answer_label``; choices
written ``"A:Diffuse uptake pattern"``) and MedEvalKit's loader ``utils/PMC_VQA/PMC_VQA.py``
(version 2, ``test_2.csv`` with ``index, Figure_path, Caption, Question, Choice A..D, Answer,
split``, ``Answer`` the letter; images under ``figures/`` or ``images/``, from ``images.zip`` /
``images_2.zip``).

The ``A:`` / ``A.`` prefix of a choice is dropped (rows carry option texts; the prompt and the
scorer letter them again, :mod:`medtune.eval.mcq`). The answer letter is ``Answer_label`` when
that column exists (version 1, whose ``Answer`` is the text), else ``Answer``.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

from medtune.data.benchmarks._common import answer_letter, check_unique, mcq_sample
from medtune.data.errors import DataError, MalformedJSONError, MissingFieldError
from medtune.data.rows import SkipCounter, resolve_image
from medtune.data.sample import Sample

__all__ = ["pmc_vqa", "PMC_VQA_FILES"]

#: split -> csv file name (version 2 first, as MedEvalKit reads ``test_2.csv``).
PMC_VQA_FILES = {
    "test": ("test_2.csv", "test.csv"),
    "test_clean": ("test_clean.csv",),
    "train": ("train_2.csv", "train.csv"),
}
_CHOICE_COLUMNS = tuple(f"Choice {c}" for c in "ABCD")
_PREFIX = re.compile(r"^\s*([A-D])\s*[:.)]\s*")


def _csv_path(root: Path, split: str, csv_file: str | None) -> Path:
    if root.is_file():
        return root
    if csv_file is not None:
        return root / csv_file
    if split not in PMC_VQA_FILES:
        raise ValueError(
            f"pmc_vqa: unknown split {split!r} (expected one of {sorted(PMC_VQA_FILES)})"
        )
    for name in PMC_VQA_FILES[split]:
        if (root / name).is_file():
            return root / name
    raise DataError(
        f"{root}: no PMC-VQA metafile for split {split!r} (expected one of "
        f"{', '.join(PMC_VQA_FILES[split])})",
        reason="missing file",
    )


def pmc_vqa(
    root: str | Path,
    split: str = "test",
    csv_file: str | None = None,
    image_dirs: tuple[str, ...] = ("figures", "images"),
    skip_bad_rows: bool = False,
) -> list[Sample]:
    """Read one PMC-VQA metafile as multiple-choice samples.

    Args:
        root: the PMC-VQA folder (csv files + ``figures/`` or ``images/``), or a csv file.
        split: ``test`` (``test_2.csv``, else ``test.csv``), ``test_clean`` or ``train``.
        csv_file: a csv name under ``root`` instead of the split's default.
        image_dirs: folders under ``root`` searched for ``Figure_path`` in order.
        skip_bad_rows: count and skip bad rows instead of raising.

    Returns:
        Samples with ``meta``: ``dataset="pmc_vqa"``, ``split``, ``task="mcq"``, ``question``,
        ``choices`` (4 texts), ``answer`` (letter), ``image`` (``Figure_path``), ``caption``
        (version 2) ; id ``pmc_vqa-<index or row>``.

    Raises:
        DataError: a missing file or column, an answer that is not A-D, a missing image.
    """
    root = Path(root)
    path = _csv_path(root, split, csv_file)
    base = path.parent if root.is_file() else root
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            rows = list(csv.DictReader(f))
            header = rows[0].keys() if rows else []
    except FileNotFoundError:
        raise DataError(f"file not found: {path}", reason="missing file") from None
    need = ("Figure_path", "Question", *_CHOICE_COLUMNS)
    missing = [c for c in need if rows and c not in header]
    label = "Answer_label" if "Answer_label" in header else "Answer"
    if rows and label not in header:
        missing.append("Answer")
    if missing:
        raise MalformedJSONError(
            f"csv header lacks {', '.join(repr(c) for c in missing)} (PMC-VQA metafiles have "
            "Figure_path, Question, Choice A..D and Answer or Answer_label)",
            file=path,
        )
    counter = SkipCounter(f"pmc_vqa {path.name}", skip_bad_rows)
    seen: dict[str, int] = {}
    out: list[Sample] = []
    for i, row in enumerate(rows):
        sid = f"pmc_vqa-{(row.get('index') or '').strip() or i}"
        ctx = {"file": path, "row": i, "row_id": sid}
        try:
            check_unique(sid, i, seen, ctx)
            for col in ("Figure_path", "Question"):
                if not (row.get(col) or "").strip():
                    raise MissingFieldError(f"empty column {col!r} (expected text)", **ctx)
            choices = [_PREFIX.sub("", row[c] or "", count=1).strip() for c in _CHOICE_COLUMNS]
            letter = answer_letter(row[label], choices, ctx, label)
            fig = row["Figure_path"].strip()
            dirs = [d for d in image_dirs if (base / d / fig).exists()] or [image_dirs[0]]
            image = resolve_image(
                base / dirs[0], fig, file=path, index=i, row_id=sid, field="Figure_path"
            )
            meta = {"dataset": "pmc_vqa", "split": split, "image": fig, "language": "en"}
            if row.get("Caption"):
                meta["caption_text"] = row["Caption"]
            out.append(mcq_sample(sid, [image], row["Question"].strip(), choices, letter, meta))
        except DataError as e:
            counter.record(e)
    return counter.finish(out)
