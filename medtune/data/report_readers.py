"""Chest X-ray report readers: OpenI / IU X-ray (Kaggle layout), MIMIC-CXR-JPG, XrayGPT's captions.

Each report becomes ``Sample(id, images=[frontal image paths], messages=[user: instruction,
assistant: report], meta)`` with ``meta["task"] = "caption"``, so that training, ``eval`` and
``medtune score`` treat reports as captions (BLEU / METEOR / ROUGE-L / CIDEr).

Which text is the target is the ``section`` option: ``"findings"``, ``"impression"`` or ``"both"``
(``"<findings> <impression>"``, either alone when the other is empty). Reports whose target is
empty and reports without a frontal image are not samples; how many were dropped, by cause, is in
the returned list's ``dropped`` counter and in the INFO log line (never silently).

Import-light: standard library only.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

from medtune.data.errors import DataError, MissingFieldError, MissingImageError
from medtune.data.report_sections import (
    SECTIONS,
    check_section,
    parse_report_sections,
    report_target,
)
from medtune.data.report_sections import normalize_text as _norm
from medtune.data.rows import SkipCounter, get_field, load_json, resolve_image
from medtune.data.sample import Sample, qa_sample
from medtune.data.tables import find_table, read_csv_rows

__all__ = [
    "REPORT_INSTRUCTIONS",
    "SECTIONS",
    "MIMIC_SPLITS",
    "openi",
    "mimic_cxr",
    "xraygpt",
    "parse_report_sections",
    "report_target",
]

logger = logging.getLogger("medtune.data")

#: Report-writing instructions; pass the list as a template list to sample one per example.
REPORT_INSTRUCTIONS = [
    "Write the radiology report for this chest X-ray.",
    "Describe the findings of this chest X-ray.",
    "What does this chest radiograph show? Write the report.",
]
MIMIC_SPLITS = ("train", "validate", "test")
FRONTAL_VIEWS = ("PA", "AP")


def _sample(rid, images, target, instruction, meta) -> Sample:
    meta.update(question=instruction, answer=target, task="caption")
    return qa_sample(rid, images, instruction, target, meta)


def _finish(counter: SkipCounter, out: list[Sample], dropped: Counter, source: str):
    samples = counter.finish(out)
    samples.dropped = dropped  # reports that are not samples by design (empty target, no frontal)
    if dropped:
        logger.info(
            "%s: kept %d reports; not samples: %s",
            source,
            len(samples),
            ", ".join(f"{k}: {v}" for k, v in sorted(dropped.items())),
        )
    return samples


# -------------------------------------------------------------------------------------- OpenI


def openi(
    root: str | Path,
    section: str = "findings",
    split: str | None = None,
    skip_bad_rows: bool = False,
    *,
    image_dir: str = "images/images_normalized",
    instruction: str = REPORT_INSTRUCTIONS[0],
) -> list[Sample]:
    """Read OpenI / IU X-ray as on Kaggle ("Chest X-rays (Indiana University)").

    Layout::

        root/indiana_reports.csv       uid, MeSH, Problems, image, indication, comparison, findings, impression
        root/indiana_projections.csv   uid, filename, projection (Frontal | Lateral)
        root/images/images_normalized/<filename>

    Args:
        root: the unpacked Kaggle folder.
        section: the target: ``findings``, ``impression`` or ``both``.
        split: OpenI has no official split: None reads every report; any other value is an error
            (split the converted file yourself, by ``uid``, and check leakage).
        skip_bad_rows: count and skip reports whose image is missing instead of raising.
        image_dir: the image folder under ``root``.
        instruction: the user turn's text.

    Returns:
        :class:`~medtune.data.rows.Samples` in ``indiana_reports.csv`` order, one per report
        with a non-empty target and a frontal image; ``id`` is the ``uid``; ``meta`` holds
        ``dataset="openi"``, ``split=None``, ``uid``, ``image`` (filenames), ``findings``,
        ``impression``, ``indication``, ``comparison``, ``mesh``, ``problems``, ``section``,
        ``question``, ``answer``, ``task="caption"``. ``.dropped`` counts the other reports.
    """
    check_section(section)
    if split is not None:
        raise DataError(
            f"openi: no official split (got split={split!r}); read all reports with split=None"
        )
    root = Path(root)
    reports_csv, proj_csv = root / "indiana_reports.csv", root / "indiana_projections.csv"
    reports = read_csv_rows(
        reports_csv, ("uid", "findings", "impression"), "the OpenI report table (Kaggle layout)"
    )
    projections = read_csv_rows(
        proj_csv, ("uid", "filename", "projection"), "the OpenI projection table (Kaggle layout)"
    )
    frontal: dict[str, list[tuple[int, str]]] = {}
    for i, row in enumerate(projections):
        if not row["uid"] or not row["filename"]:
            raise MissingFieldError("empty uid or filename", file=proj_csv, row=i)
        if row["projection"].lower() == "frontal":
            frontal.setdefault(row["uid"], []).append((i, row["filename"]))
    counter = SkipCounter("openi", skip_bad_rows)
    dropped: Counter = Counter()
    out: list[Sample] = []
    seen: set[str] = set()
    for i, row in enumerate(reports):
        try:
            uid = row["uid"]
            if not uid:
                raise MissingFieldError("empty uid", file=reports_csv, row=i)
            if uid in seen:
                raise DataError("duplicate uid", file=reports_csv, row=i, row_id=uid, id_name="uid")
            seen.add(uid)
            target = report_target(row["findings"], row["impression"], section)
            if not target:
                dropped[f"empty {section}"] += 1
                continue
            if uid not in frontal:
                dropped["no frontal image"] += 1
                continue
            names = [name for _, name in frontal[uid]]
            images = [
                resolve_image(
                    root / image_dir, name, file=proj_csv, index=j, row_id=uid, id_name="uid",
                    field="filename",
                )
                for j, name in frontal[uid]
            ]  # fmt: skip
            meta = {
                "dataset": "openi",
                "split": None,
                "uid": uid,
                "image": names,
                "findings": _norm(row["findings"]),
                "impression": _norm(row["impression"]),
                "indication": _norm(row.get("indication")),
                "comparison": _norm(row.get("comparison")),
                "mesh": row.get("MeSH", ""),
                "problems": row.get("Problems", ""),
                "section": section,
            }
            out.append(_sample(uid, images, target, instruction, meta))
        except DataError as e:
            counter.record(e)
    return _finish(counter, out, dropped, "openi")


# ---------------------------------------------------------------------------------- MIMIC-CXR


def _study_dir(subject: str, study: str) -> str:
    return f"files/p{subject[:2]}/p{subject}/s{study}"


def mimic_cxr(
    root: str | Path,
    split: str = "train",
    section: str = "findings",
    skip_bad_rows: bool = False,
    *,
    reports_root: str | Path | None = None,
    max_images: int | None = None,
    instruction: str = REPORT_INSTRUCTIONS[0],
) -> list[Sample]:
    """Read MIMIC-CXR-JPG with its free-text reports, one sample per study of ``split``.

    Layout (PhysioNet ``mimic-cxr-jpg/2.0.0``, with ``mimic-cxr-reports.zip`` unpacked under the
    same root, or under ``reports_root``)::

        root/mimic-cxr-2.0.0-split.csv[.gz]      dicom_id, study_id, subject_id, split
        root/mimic-cxr-2.0.0-metadata.csv[.gz]   dicom_id, subject_id, study_id, ViewPosition, ...
        root/files/pXX/pSUBJECT/sSTUDY/DICOM_ID.jpg   (XX = first two digits of the subject id)
        root/files/pXX/pSUBJECT/sSTUDY.txt            the report (FINDINGS: / IMPRESSION: ...)

    Args:
        root: the MIMIC-CXR-JPG folder.
        split: ``train``, ``validate`` or ``test`` (the official split).
        section: the target: ``findings``, ``impression`` or ``both``
            (:func:`parse_report_sections`).
        skip_bad_rows: count and skip studies with a missing report or image instead of raising.
        reports_root: where the reports' ``files/`` tree is, if not under ``root``.
        max_images: keep at most this many frontal images per study (PA before AP, then file order).
        instruction: the user turn's text.

    Returns:
        :class:`~medtune.data.rows.Samples` in split-file order of studies; ``id`` is the study
        id; ``meta`` holds ``dataset="mimic_cxr"``, ``split``, ``study_id``, ``subject_id``,
        ``dicom_ids``, ``view_positions``, ``image`` (paths relative to ``root``), ``findings``,
        ``impression``, ``section``, ``question``, ``answer``, ``task="caption"``.
    """
    check_section(section)
    if split not in MIMIC_SPLITS:
        raise DataError(f"mimic_cxr: unknown split {split!r} (expected one of {MIMIC_SPLITS})")
    root = Path(root)
    reports_root = Path(reports_root) if reports_root is not None else root
    split_csv = find_table(root, "mimic-cxr-2.0.0-split.csv", "the MIMIC-CXR-JPG split table")
    meta_csv = find_table(root, "mimic-cxr-2.0.0-metadata.csv", "the MIMIC-CXR-JPG metadata")
    cols = ("dicom_id", "study_id", "subject_id")
    split_rows = read_csv_rows(split_csv, (*cols, "split"), "the MIMIC-CXR-JPG split table")
    views = {
        r["dicom_id"]: r["ViewPosition"]
        for r in read_csv_rows(meta_csv, (*cols, "ViewPosition"), "the MIMIC-CXR-JPG metadata")
    }
    studies: dict[str, dict] = {}
    for i, r in enumerate(split_rows):
        if r["split"] not in MIMIC_SPLITS:
            raise DataError(
                f"split is {r['split']!r}, expected one of {MIMIC_SPLITS}", file=split_csv, row=i
            )
        if r["split"] != split:
            continue
        if not (r["dicom_id"] and r["study_id"].isdigit() and r["subject_id"].isdigit()):
            raise MissingFieldError(
                "expected a dicom_id and numeric study_id and subject_id", file=split_csv, row=i
            )
        st = studies.setdefault(r["study_id"], {"row": i, "subject": r["subject_id"], "dicoms": []})
        st["dicoms"].append((i, r["dicom_id"]))
    counter = SkipCounter(f"mimic_cxr {split}", skip_bad_rows)
    dropped: Counter = Counter()
    out: list[Sample] = []
    for study, st in studies.items():
        try:
            fctx = {"file": split_csv, "row": st["row"], "row_id": study, "id_name": "study_id"}
            rel_dir = _study_dir(st["subject"], study)
            report = reports_root / f"{rel_dir}.txt"
            if not report.is_file():
                raise DataError(
                    f"report not found: {report} (expected the unpacked mimic-cxr-reports.zip "
                    f"files/pXX/pSUBJECT/sSTUDY.txt under {reports_root})",
                    reason="missing report",
                    **fctx,
                )
            text = report.read_text(encoding="utf-8", errors="replace")
            sections = parse_report_sections(text)
            target = report_target(sections["findings"], sections["impression"], section)
            if not target:
                dropped[f"empty {section}"] += 1
                continue
            front = [(i, d) for i, d in st["dicoms"] if views.get(d, "") in FRONTAL_VIEWS]
            if not front:
                dropped["no frontal image"] += 1
                continue
            front.sort(key=lambda x: FRONTAL_VIEWS.index(views[x[1]]))  # stable: PA, then AP
            front = front[:max_images] if max_images is not None else front
            rels = [f"{rel_dir}/{d}.jpg" for _, d in front]
            images = [
                resolve_image(root, rel, file=split_csv, index=i, row_id=d, id_name="dicom_id")
                for (i, d), rel in zip(front, rels)
            ]
            meta = {
                "dataset": "mimic_cxr",
                "split": split,
                "study_id": study,
                "subject_id": st["subject"],
                "dicom_ids": [d for _, d in front],
                "view_positions": [views[d] for _, d in front],
                "image": rels,
                "findings": sections["findings"],
                "impression": sections["impression"],
                "section": section,
            }
            out.append(_sample(study, images, target, instruction, meta))
        except DataError as e:
            counter.record(e)
    return _finish(counter, out, dropped, f"mimic_cxr {split}")


# ------------------------------------------------------------------------------------ XrayGPT


def xraygpt(
    root: str | Path,
    skip_bad_rows: bool = False,
    *,
    annotations: str = "filter_cap.json",
    image_dir: str = "image",
    dataset: str = "xraygpt",
    instruction: str = REPORT_INSTRUCTIONS[0],
) -> list[Sample]:
    """Read XrayGPT's cleaned summaries (its ``dataset/mimic`` or ``dataset/openi`` folder).

    Layout (XrayGPT README and ``image_text_pair_builder.py``)::

        root/filter_cap.json   {"annotations": [{"image_id": "...", "caption": "..."}, ...]}
        root/image/<image_id>.jpg   (XrayGPT's OpenI loader opens <image_id>.png: both are tried)

    Args:
        root: the folder holding ``filter_cap.json`` and ``image/``.
        skip_bad_rows: count and skip bad rows instead of raising.
        annotations: the annotation file name.
        image_dir: the image folder.
        dataset: ``meta["dataset"]`` (e.g. ``xraygpt_mimic``, ``xraygpt_openi``).
        instruction: the user turn's text.

    Returns:
        :class:`~medtune.data.rows.Samples` in file order; ``id`` is the ``image_id``; ``meta``
        holds ``dataset``, ``split=None``, ``image_id``, ``image``, ``caption``, ``question``,
        ``answer``, ``task="caption"``.
    """
    root = Path(root)
    path = root / annotations
    data = load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise DataError(
            'expected {"annotations": [{"image_id": ..., "caption": ...}, ...]} (XrayGPT layout)',
            file=path,
            reason="malformed JSON",
        )
    counter = SkipCounter(f"xraygpt {path.name}", skip_bad_rows)
    out: list[Sample] = []
    seen: set[str] = set()
    for i, row in enumerate(data["annotations"]):
        try:
            image_id = get_field(
                row, "image_id", file=path, index=i, types=(str, int), expected="an image id"
            )
            rid = str(image_id)
            fctx = {"file": path, "index": i, "row_id": rid, "id_name": "image_id"}
            caption = _norm(get_field(row, "caption", **fctx, expected="a caption string"))
            if not caption:
                raise MissingFieldError("empty caption", file=path, row=i, row_id=rid)
            if rid in seen:
                raise DataError("duplicate image_id", file=path, row=i, row_id=rid)
            seen.add(rid)
            folder = root / image_dir
            name = next(
                (f"{rid}{ext}" for ext in (".jpg", ".png") if (folder / f"{rid}{ext}").is_file()),
                None,
            )
            if name is None:
                raise MissingImageError(
                    f"image not found: {folder / rid}.jpg (nor .png)", file=path, row=i, row_id=rid
                )
            images = [resolve_image(folder, name, **fctx, field="image_id")]
            meta = {
                "dataset": dataset,
                "split": None,
                "image_id": rid,
                "image": name,
                "caption": caption,
            }
            out.append(_sample(rid, images, caption, instruction, meta))
        except DataError as e:
            counter.record(e)
    return counter.finish(out)
