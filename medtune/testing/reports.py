"""Tiny on-disk copies of OpenI (Kaggle), MIMIC-CXR-JPG and XrayGPT's captions, in their real layouts.

For the report readers (:mod:`medtune.data.report_readers`), the converters and the recipe tests. Images
are small synthetic chest X-rays (:func:`medtune.testing.datasets.make_medical_image`); the
numbers in ``*_COUNTS`` are what the readers must return.

OpenI (:func:`make_openi_fixture` -> ``<root>/openi``): reports 1..5 with the Kaggle columns;
uid 2 has no findings, uid 5 no impression, uid 3 only a lateral image, uid 4 two frontal images
and a findings text broken over lines with doubled spaces.

MIMIC-CXR-JPG (:func:`make_mimic_cxr_fixture` -> ``<root>/mimic-cxr-jpg``): the split table
gzipped (as PhysioNet ships it), the metadata table plain; six studies of three subjects in
train / validate / test; one study with only a lateral view, one report without FINDINGS, one
study with AP and PA images (PA comes first), reports with ``FINAL REPORT`` / ``WET READ`` /
``INDICATION`` / ``COMPARISON`` headers and ``Findings:`` in mixed case.

XrayGPT (:func:`make_xraygpt_fixture` -> ``<root>/xraygpt``): ``filter_cap.json`` with three
annotations, images ``image/<image_id>.jpg`` (one ``.png``, as XrayGPT's OpenI loader opens).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from pathlib import Path

from medtune.testing.datasets import save_xray

__all__ = [
    "make_openi_fixture",
    "make_mimic_cxr_fixture",
    "make_xraygpt_fixture",
    "OPENI_FIXTURE_COUNTS",
    "MIMIC_FIXTURE_COUNTS",
    "MIMIC_REPORTS",
    "XRAYGPT_FIXTURE_COUNT",
]


def _csv_text(header: list[str], rows: list[list]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


# ------------------------------------------------------------------------------------ OpenI

#: uid -> (findings, impression, projections)
_OPENI = {
    1: (
        "The cardiac silhouette and mediastinum size are within normal limits. There is no "
        "pulmonary edema. There is no focal consolidation.",
        "Normal chest x-XXXX.",
        ["Frontal", "Lateral"],
    ),
    2: ("", "No active disease.", ["Frontal", "Lateral"]),
    3: ("Heart size is enlarged. No pneumothorax.", "Cardiomegaly.", ["Lateral"]),
    4: (
        "Small  left\npleural effusion.   Mild basilar\natelectasis.",
        "Left pleural effusion.",
        ["Frontal", "Frontal", "Lateral"],
    ),
    5: ("Lungs are clear bilaterally.", "", ["Frontal"]),
}
#: Samples :func:`medtune.data.report_readers.openi` returns per section, and what it drops.
OPENI_FIXTURE_COUNTS = {
    "findings": {"kept": [1, 4, 5], "dropped": {"empty findings": 1, "no frontal image": 1}},
    "impression": {"kept": [1, 2, 4], "dropped": {"empty impression": 1, "no frontal image": 1}},
    "both": {"kept": [1, 2, 4, 5], "dropped": {"no frontal image": 1}},
}


def make_openi_fixture(root: str | Path) -> Path:
    """Write the OpenI Kaggle layout under ``root/openi``; returns that folder."""
    base = Path(root) / "openi"
    img_dir = base / "images" / "images_normalized"
    reports, projections = [], []
    for uid, (findings, impression, views) in _OPENI.items():
        reports.append(
            [uid, "normal" if uid == 1 else "Cardiomegaly", "normal", "Xray Chest PA and Lateral",
             "Chest pain.", "None.", findings, impression]
        )  # fmt: skip
        for k, view in enumerate(views):
            name = f"{uid}_IM-{uid:04d}-{1001 + k}.dcm.png"
            projections.append([uid, name, view])
            save_xray(img_dir / name, seed=100 * uid + k)
    base.mkdir(parents=True, exist_ok=True)
    header = ["uid", "MeSH", "Problems", "image", "indication", "comparison", "findings"]
    (base / "indiana_reports.csv").write_text(
        _csv_text([*header, "impression"], reports), encoding="utf-8"
    )
    (base / "indiana_projections.csv").write_text(
        _csv_text(["uid", "filename", "projection"], projections), encoding="utf-8"
    )
    return base


# -------------------------------------------------------------------------------- MIMIC-CXR

_R1 = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with new onset ascites  // eval for infection

 TECHNIQUE:  Chest PA and lateral

 COMPARISON:  None.

 FINDINGS:

 There is no focal consolidation, pleural effusion or pneumothorax.  Bilateral
 nodular opacities that most likely represent nipple shadows.

 IMPRESSION:

 No acute cardiopulmonary process.
"""
_R2 = """WET READ: ___ ___ ___ 10:12 PM
  Mild pulmonary edema.
 ______________________________________________________________________________
                                 FINAL REPORT
 INDICATION:  Shortness of breath.

 Findings:  Moderate cardiomegaly with mild
 pulmonary  edema.
 Impression:  Cardiomegaly and mild edema.

 NOTIFICATION:  The findings were discussed with Dr. ___ at 10:30 PM.
"""
_R3 = """                                 FINAL REPORT
 FINDINGS:  Lateral view only. No effusion.

 IMPRESSION:  No acute process.
"""
_R4 = """                                 FINAL REPORT
 HISTORY:  Cough.

 IMPRESSION:  Right lower lobe pneumonia.
"""
_R5 = """                                 FINAL REPORT
 FINDINGS:  Heart size is normal. Lungs are clear.

 IMPRESSION:  Normal chest radiograph.
"""
_R6 = """                                 FINAL REPORT
 FINDINGS:  Right pleural effusion.

 IMPRESSION:  Effusion.

 ADDENDUM:  Reviewed.
"""

# study -> (subject, split, [(dicom_id, ViewPosition)], report)
_MIMIC = {
    "50000001": ("10000032", "train", [("a1", "PA"), ("a2", "LATERAL")], _R1),
    "50000002": ("10000032", "train", [("b1", "AP"), ("b2", "PA")], _R2),
    "50000003": ("11000011", "train", [("c1", "LATERAL")], _R3),
    "50000004": ("11000011", "train", [("d1", "PA")], _R4),
    "50000005": ("12000001", "validate", [("e1", "PA"), ("e2", "LL")], _R5),
    "50000006": ("12000001", "test", [("f1", "AP")], _R6),
}
#: Parsed sections of the fixture's reports (what parse_report_sections must return).
MIMIC_REPORTS = {
    "50000001": {
        "findings": "There is no focal consolidation, pleural effusion or pneumothorax. "
        "Bilateral nodular opacities that most likely represent nipple shadows.",
        "impression": "No acute cardiopulmonary process.",
    },
    "50000002": {
        "findings": "Moderate cardiomegaly with mild pulmonary edema.",
        "impression": "Cardiomegaly and mild edema.",
    },
    "50000003": {"findings": "Lateral view only. No effusion.", "impression": "No acute process."},
    "50000004": {"findings": "", "impression": "Right lower lobe pneumonia."},
    "50000005": {
        "findings": "Heart size is normal. Lungs are clear.",
        "impression": "Normal chest radiograph.",
    },
    "50000006": {"findings": "Right pleural effusion.", "impression": "Effusion."},
}
#: (split, section) -> kept study ids, in order.
MIMIC_FIXTURE_COUNTS = {
    ("train", "findings"): ["50000001", "50000002"],
    ("train", "impression"): ["50000001", "50000002", "50000004"],
    ("train", "both"): ["50000001", "50000002", "50000004"],
    ("validate", "findings"): ["50000005"],
    ("test", "findings"): ["50000006"],
}


def mimic_dicom_id(short: str) -> str:
    """The fixture's full dicom id for a short name (the real ids are 5 dash-joined hex groups)."""
    h = short.encode().hex().ljust(8, "0")[:8]
    return f"{h}-bde0afdd-112c0b34-7bc16630-4e38{h[:4]}"


def make_mimic_cxr_fixture(root: str | Path) -> Path:
    """Write the MIMIC-CXR-JPG layout (+ reports) under ``root/mimic-cxr-jpg``; returns it."""
    base = Path(root) / "mimic-cxr-jpg"
    split_rows, meta_rows = [], []
    for n, (study, (subject, split, dicoms, report)) in enumerate(_MIMIC.items()):
        study_dir = base / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}"
        for k, (short, view) in enumerate(dicoms):
            dicom = mimic_dicom_id(short)
            split_rows.append([dicom, study, subject, split])
            meta_rows.append(
                [dicom, subject, study, "CHEST (PA AND LAT)", view, 3056, 2544, 21800506,
                 213014.531, "CHEST (PA AND LAT)", "postero-anterior", "Erect"]
            )  # fmt: skip
            save_xray(study_dir / f"{dicom}.jpg", seed=1000 + 10 * n + k)
        (study_dir.parent / f"s{study}.txt").write_text(report, encoding="utf-8")
    split_csv = _csv_text(["dicom_id", "study_id", "subject_id", "split"], split_rows)
    (base / "mimic-cxr-2.0.0-split.csv.gz").write_bytes(gzip.compress(split_csv.encode()))
    meta_header = [
        "dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition",
        "Rows", "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning",
        "ViewCodeSequence_CodeMeaning", "PatientOrientationCodeSequence_CodeMeaning",
    ]  # fmt: skip
    (base / "mimic-cxr-2.0.0-metadata.csv").write_text(
        _csv_text(meta_header, meta_rows), encoding="utf-8"
    )
    return base


# ----------------------------------------------------------------------------------- XrayGPT

_XRAYGPT = [
    ("abea5eb9-b7c32823-3a14c5ca-77868030-69c83139", ".jpg",
     "The chest x-ray shows no focal consolidation, effusion or pneumothorax."),
    ("427446c1-881f5cce-85191ce1-91a58ba9-0a57d3f5", ".jpg",
     "There is mild cardiomegaly. The impression suggests mild pulmonary edema."),
    ("7", ".png", "The lungs are clear and the heart size is normal."),
]  # fmt: skip
XRAYGPT_FIXTURE_COUNT = len(_XRAYGPT)


def make_xraygpt_fixture(root: str | Path) -> Path:
    """Write XrayGPT's ``filter_cap.json`` + ``image/`` under ``root/xraygpt``; returns it."""
    base = Path(root) / "xraygpt"
    anns = []
    for n, (image_id, ext, caption) in enumerate(_XRAYGPT):
        save_xray(base / "image" / f"{image_id}{ext}", seed=2000 + n)
        anns.append({"image_id": image_id, "caption": caption})
    (base / "filter_cap.json").write_text(json.dumps({"annotations": anns}), encoding="utf-8")
    return base
