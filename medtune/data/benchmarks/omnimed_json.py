"""OmniMedVQA: one QA json per source dataset under ``QA_information/`` plus ``Images/``.

Source: MedEvalKit's loader ``utils/OmniMedVQA/OmniMedVQA.py`` (alibaba-damo-academy/MedEvalKit)
and the release zip (``OmniMedVQA/QA_information/{Open-access,Restricted-access}/<source>.json``,
``OmniMedVQA/Images/...``). Each json is a list of rows with ``dataset``, ``question_id``,
``question_type``, ``question``, ``gt_answer`` (the option *text*), ``image_path`` (relative to
the release root), ``option_A`` .. ``option_D`` (two to four present) and ``modality_type``.

As MedEvalKit does, the answer letter is the option whose text equals ``gt_answer``; a row where
none does is refused by name (MedEvalKit would keep the text and score it against letters).
``modality_type`` and ``question_type`` are kept for per-group tables (``modality``,
``question_type``), the source file as ``subset``.
"""

from __future__ import annotations

from pathlib import Path

from medtune.data.benchmarks._common import LETTERS, check_unique, mcq_sample
from medtune.data.errors import BadValueError, DataError
from medtune.data.rows import SkipCounter, get_field, load_json, resolve_image
from medtune.data.sample import Sample

__all__ = ["omnimedvqa"]

ACCESS = ("Open-access", "Restricted-access")


def omnimedvqa(
    root: str | Path,
    access: list[str] | str = ("Open-access",),
    sources: list[str] | None = None,
    split: str = "test",
    skip_bad_rows: bool = False,
) -> list[Sample]:
    """Read OmniMedVQA as multiple-choice samples.

    Args:
        root: the release folder holding ``QA_information/`` and ``Images/``.
        access: which ``QA_information`` sub-folders to read (MedEvalKit reads ``Open-access``).
        sources: keep only these json files (stem, e.g. ``"Chest CT Scan"``); None keeps all.
        split: the ``meta["split"]`` label (the release has one split).
        skip_bad_rows: count and skip bad rows instead of raising.

    Returns:
        Samples (files in name order, rows in file order), id ``omnimedvqa-<question_id>``;
        ``meta``: ``dataset="omnimedvqa"``, ``task="mcq"``, ``choices``, ``answer`` (letter),
        ``modality``, ``question_type``, ``subset`` (source file stem), ``source_dataset``,
        ``image`` (``image_path``).

    Raises:
        DataError: a missing folder or file, a row without a field, no option equal to
            ``gt_answer``, a missing image.
    """
    root = Path(root)
    access = [access] if isinstance(access, str) else list(access)
    bad = [a for a in access if a not in ACCESS]
    if bad:
        raise ValueError(f"omnimedvqa: access {bad} (expected some of {list(ACCESS)})")
    files = []
    for a in access:
        folder = root / "QA_information" / a
        if not folder.is_dir():
            raise DataError(
                f"{root}: not an OmniMedVQA folder (expected QA_information/{a}/*.json)",
                reason="missing file",
            )
        files += sorted(folder.glob("*.json"))
    if sources is not None:
        files = [f for f in files if f.stem in set(sources)]
    counter = SkipCounter("omnimedvqa", skip_bad_rows)
    seen: dict[str, int] = {}
    out: list[Sample] = []
    for path in files:
        rows = load_json(path)
        if not isinstance(rows, list):
            raise DataError(f"{path}: top level is {type(rows).__name__}, expected a list of rows")
        for i, row in enumerate(rows):
            try:
                qid = get_field(
                    row, "question_id", file=path, index=i, types=(str, int), expected="an id"
                )
                sid = f"omnimedvqa-{qid}"
                ctx = {"file": path, "row": i, "row_id": qid, "id_name": "question_id"}
                fctx = {"file": path, "index": i, "row_id": qid, "id_name": "question_id"}
                check_unique(sid, i, seen, ctx)
                question = get_field(row, "question", **fctx)
                gt = get_field(row, "gt_answer", **fctx)
                image_rel = get_field(row, "image_path", **fctx)
                choices = []
                for letter in LETTERS[:4]:
                    if f"option_{letter}" not in row:
                        break
                    choices.append(get_field(row, f"option_{letter}", **fctx))
                if len(choices) < 2:
                    raise BadValueError(
                        "fewer than two options (expected option_A, option_B, ...)", **ctx
                    )
                if gt not in choices:
                    raise BadValueError(
                        f"gt_answer {gt!r} equals none of the options {choices}", **ctx
                    )
                image = resolve_image(root, image_rel, **fctx, field="image_path")
                meta = {
                    "dataset": "omnimedvqa",
                    "split": split,
                    "image": image_rel,
                    "language": "en",
                    "modality": get_field(row, "modality_type", **fctx, required=False),
                    "question_type": get_field(row, "question_type", **fctx, required=False),
                    "subset": path.stem,
                    "source_dataset": row.get("dataset"),
                }
                letter = LETTERS[choices.index(gt)]
                out.append(mcq_sample(sid, [image], question, choices, letter, meta))
            except DataError as e:
                counter.record(e)
    return counter.finish(out)
