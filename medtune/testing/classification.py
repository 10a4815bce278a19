"""Tiny on-disk copies of ChestX-ray14, CheXpert, RSNA Pneumonia and SIIM-ACR in their real layouts.

For :mod:`medtune.data.classification` and the zero-shot / linear-probe recipe tests. PNG/JPEG
images are synthetic (:func:`medtune.testing.datasets.make_medical_image`); DICOMs are pydicom's
own test images (``CT_small.dcm``, ``MR_small.dcm``) copied under the dataset's names. The
``*_FIXTURE`` dicts hold what the readers must return.
"""

from __future__ import annotations

import csv
import io
import shutil
from pathlib import Path

from medtune.testing.datasets import save_xray

__all__ = [
    "make_chestxray14_fixture",
    "make_chexpert_fixture",
    "make_rsna_fixture",
    "make_siim_fixture",
    "CHESTXRAY14_FIXTURE",
    "CHEXPERT_FIXTURE",
    "RSNA_FIXTURE",
    "SIIM_FIXTURE",
]


def _dicom(path: Path, n: int) -> None:
    from pydicom.data import get_testdata_file

    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(get_testdata_file(("CT_small.dcm", "MR_small.dcm")[n % 2]), path)


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(buf.getvalue(), encoding="utf-8")


# -------------------------------------------------------------------------------- ChestX-ray14

# name -> (Finding Labels, folder); the Kaggle copy splits images over images_0XX/images/.
_CXR14 = {
    "00000001_000.png": ("Cardiomegaly", "images_001/images"),
    "00000001_001.png": ("Cardiomegaly|Emphysema", "images_001/images"),
    "00000002_000.png": ("No Finding", "images_002/images"),
    "00000003_000.png": ("Hernia|Infiltration|Pleural_Thickening", "images"),
    "00000004_000.png": ("Effusion", "images"),
    "00000005_000.png": ("No Finding", "images"),
}
#: split -> image names in table order, and positives per name.
CHESTXRAY14_FIXTURE = {
    "train_val": ["00000001_000.png", "00000001_001.png", "00000002_000.png"],
    "test": ["00000003_000.png", "00000004_000.png", "00000005_000.png"],
    "positives": {n: set(f.split("|")) - {"No Finding"} for n, (f, _) in _CXR14.items()},
}


def make_chestxray14_fixture(root: str | Path) -> Path:
    """Write ``Data_Entry_2017.csv``, the split lists and images under ``root/chestxray14``."""
    base = Path(root) / "chestxray14"
    rows = []
    for n, (name, (labels, folder)) in enumerate(_CXR14.items()):
        save_xray(base / folder / name, seed=300 + n)
        pid = int(name[:8])
        # The release's columns, including its trailing empty column.
        rows.append(
            [name, labels, int(name[9:12]), pid, 58, "M", "PA", 2682, 2749, 0.143, 0.143, ""]
        )
    header = [
        "Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age",
        "Patient Gender", "View Position", "OriginalImage[Width", "Height]",
        "OriginalImagePixelSpacing[x", "y]", "",
    ]  # fmt: skip
    _write_csv(base / "Data_Entry_2017.csv", header, rows)
    for split, names in (("train_val", CHESTXRAY14_FIXTURE["train_val"]),
                         ("test", CHESTXRAY14_FIXTURE["test"])):  # fmt: skip
        (base / f"{split}_list.txt").write_text("\n".join(names) + "\n")
    return base


# ------------------------------------------------------------------------------------ CheXpert

_CHEXPERT_OBS = [
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
    "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
    "Pleural Other", "Fracture", "Support Devices",
]  # fmt: skip
# (path under the release folder, Frontal/Lateral, {observation: cell}); other cells blank.
_CHEXPERT = {
    "valid": [
        ("valid/patient64541/study1/view1_frontal.jpg", "Frontal",
         {"Cardiomegaly": "1.0", "Edema": "-1.0", "Pleural Effusion": "0.0"}),
        ("valid/patient64542/study1/view1_frontal.jpg", "Frontal", {"No Finding": "1.0"}),
        ("valid/patient64542/study1/view2_lateral.jpg", "Lateral",
         {"Atelectasis": "-1.0", "Consolidation": "1.0"}),
    ],
    "train": [
        ("train/patient00001/study1/view1_frontal.jpg", "Frontal",
         {"Support Devices": "1.0", "Pleural Effusion": "-1.0"}),
    ],
}  # fmt: skip
CHEXPERT_FIXTURE = {
    split: [(path, view, cells) for path, view, cells in rows] for split, rows in _CHEXPERT.items()
}


def make_chexpert_fixture(root: str | Path) -> Path:
    """Write ``CheXpert-v1.0-small/{train,valid}.csv`` + images under ``root``; returns the
    release folder."""
    base = Path(root) / "CheXpert-v1.0-small"
    for split, rows in _CHEXPERT.items():
        out = []
        for n, (path, view, cells) in enumerate(rows):
            save_xray(base / path, seed=400 + n)
            row = [
                f"CheXpert-v1.0-small/{path}",
                "Female",
                68,
                view,
                "AP" if view == "Frontal" else "",
            ]
            row += [cells.get(c, "") for c in _CHEXPERT_OBS]
            out.append(row)
        _write_csv(
            base / f"{split}.csv",
            ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *_CHEXPERT_OBS],
            out,
        )
    return base


# ---------------------------------------------------------------------------------------- RSNA

# One row per box; patient b has two boxes, c none (Target 0).
_RSNA = [
    ("0004cfab-14fd-4e49-80ba-63a80b6bddd6", "", "", "", "", 0),
    ("00436515-870c-4b36-a041-de91049b9ab4", 264.0, 152.0, 213.0, 379.0, 1),
    ("00436515-870c-4b36-a041-de91049b9ab4", 562.0, 152.0, 256.0, 453.0, 1),
    ("00322d4d-1c29-4943-afc9-b6754be640eb", "", "", "", "", 0),
]
RSNA_FIXTURE = {
    "0004cfab-14fd-4e49-80ba-63a80b6bddd6": 0,
    "00436515-870c-4b36-a041-de91049b9ab4": 1,
    "00322d4d-1c29-4943-afc9-b6754be640eb": 0,
}


def make_rsna_fixture(root: str | Path) -> Path:
    """Write ``stage_2_train_labels.csv`` + DICOMs under ``root/rsna``; returns it."""
    base = Path(root) / "rsna"
    _write_csv(
        base / "stage_2_train_labels.csv",
        ["patientId", "x", "y", "width", "height", "Target"],
        [list(r) for r in _RSNA],
    )
    for n, pid in enumerate(RSNA_FIXTURE):
        _dicom(base / "stage_2_train_images" / f"{pid}.dcm", n)
    return base


# ---------------------------------------------------------------------------------------- SIIM

_SIIM_IDS = [
    "1.2.276.0.7230010.3.1.4.8323329.5597.1517875188.959090",
    "1.2.276.0.7230010.3.1.4.8323329.12515.1517875239.501137",
    "1.2.276.0.7230010.3.1.4.8323329.4904.1517875185.355709",
]
# (ImageId, EncodedPixels): the second image has two masks; the others none.
_SIIM_ROWS = [
    (_SIIM_IDS[0], "-1"),
    (_SIIM_IDS[1], "175349 7 1013 12 1009 17 1005 19"),
    (_SIIM_IDS[1], "407576 2 1021 7 1015 10"),
    (_SIIM_IDS[2], "-1"),
]
SIIM_FIXTURE = {_SIIM_IDS[0]: 0, _SIIM_IDS[1]: 1, _SIIM_IDS[2]: 0}


def make_siim_fixture(root: str | Path) -> Path:
    """Write ``train-rle.csv`` (with the release's ``" EncodedPixels"`` header) and a DICOM tree
    ``dicom-images-train/<study>/<series>/<ImageId>.dcm`` under ``root/siim``; returns it."""
    base = Path(root) / "siim"
    _write_csv(
        base / "train-rle.csv", ["ImageId", " EncodedPixels"], [[i, f" {r}"] for i, r in _SIIM_ROWS]
    )
    for n, iid in enumerate(_SIIM_IDS):
        study = f"1.2.276.0.7230010.3.1.2.8323329.{5597 + n}.1517875188.959089"
        series = f"1.2.276.0.7230010.3.1.3.8323329.{5597 + n}.1517875188.959088"
        _dicom(base / "dicom-images-train" / study / series / f"{iid}.dcm", n)
    return base
