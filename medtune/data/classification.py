"""Multi-label chest X-ray classification readers: ChestX-ray14, CheXpert, RSNA Pneumonia, SIIM-ACR.

Each reader returns :class:`~medtune.data.rows.Samples` of :class:`LabeledImage` (one per image),
in the layouts users download. ``labels`` maps a class name to 0 or 1; a class whose label is not
known for an image (CheXpert's uncertain label under the ``ignore`` policy) is left out of that
image's ``labels``, and scoring leaves the image out of that class only
(:mod:`medtune.eval.classification_metrics`). Image loading (PNG/JPEG/DICOM) is
:func:`medtune.data.images.load_image`. RSNA and SIIM-ACR live in :mod:`medtune.data.kaggle_chest`
and are re-exported here.

Import-light: standard library only.
"""

from __future__ import annotations

import os
from pathlib import Path

from medtune.data.errors import BadValueError, DataError, MissingFieldError, MissingImageError
from medtune.data.kaggle_chest import rsna_pneumonia, siim_acr
from medtune.data.labeled import LabeledImage
from medtune.data.rows import SkipCounter
from medtune.data.tables import read_csv_rows

__all__ = [
    "LabeledImage",
    "CHESTXRAY14_CLASSES",
    "CHEXPERT_CLASSES",
    "CHEXPERT_OBSERVATIONS",
    "UNCERTAIN_POLICIES",
    "chestxray14",
    "chexpert",
    "rsna_pneumonia",
    "siim_acr",
]


# --------------------------------------------------------------------------------- ChestX-ray14

CHESTXRAY14_CLASSES = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)
_CXR14_SPLITS = {"train_val": "train_val_list.txt", "test": "test_list.txt"}


def _image_index(folders: list[Path]) -> dict[str, str]:
    """File name -> absolute path over ``folders`` (one directory listing each)."""
    index: dict[str, str] = {}
    for folder in folders:
        if folder.is_dir():
            for name in os.listdir(folder):
                index.setdefault(name, os.path.abspath(folder / name))
    return index


def chestxray14(
    root: str | Path, split: str | None = "test", skip_bad_rows: bool = False
) -> list[LabeledImage]:
    """Read NIH ChestX-ray14 as released (NIH box or the Kaggle "NIH Chest X-rays" copy).

    Layout::

        root/Data_Entry_2017.csv    Image Index, Finding Labels (A|B or "No Finding"), Patient ID,
                                    View Position, ...
        root/train_val_list.txt     image names, one per line;  root/test_list.txt
        root/images/<name>.png  or  root/images_001/images/<name>.png ... images_012/images/

    Args:
        root: the dataset folder.
        split: ``train_val``, ``test`` (the official lists) or None (every row).
        skip_bad_rows: count and skip rows with an unknown label or a missing image.

    Returns:
        One :class:`LabeledImage` per image of the split, in ``Data_Entry_2017.csv`` order;
        ``labels`` holds all 14 classes ("No Finding" = all zeros).
    """
    root = Path(root)
    table = root / "Data_Entry_2017.csv"
    rows = read_csv_rows(table, ("Image Index", "Finding Labels"), "the ChestX-ray14 label table")
    keep: set[str] | None = None
    if split is not None:
        if split not in _CXR14_SPLITS:
            raise DataError(
                f"chestxray14: unknown split {split!r} (expected {sorted(_CXR14_SPLITS)} or None)"
            )
        lst = root / _CXR14_SPLITS[split]
        if not lst.is_file():
            raise DataError(
                f"file not found: {lst} (the official {split} list)", reason="missing file"
            )
        keep = {line.strip() for line in lst.read_text().splitlines() if line.strip()}
    index = _image_index([root / "images", *sorted(root.glob("images_*/images"))])
    counter = SkipCounter(f"chestxray14 {split}", skip_bad_rows)
    out = []
    for i, row in enumerate(rows):
        name = row["Image Index"]
        if keep is not None and name not in keep:
            continue
        try:
            fctx = {"file": table, "row": i, "row_id": name, "id_name": "image"}
            found = {f.strip() for f in row["Finding Labels"].split("|") if f.strip()}
            if not found:
                raise MissingFieldError("empty 'Finding Labels'", **fctx)
            unknown = sorted(found - set(CHESTXRAY14_CLASSES) - {"No Finding"})
            if unknown or ("No Finding" in found and len(found) > 1):
                raise BadValueError(
                    f"'Finding Labels' {row['Finding Labels']!r}: expected '|'-joined classes "
                    f"of {list(CHESTXRAY14_CLASSES)}, or 'No Finding' alone",
                    **fctx,
                )
            if name not in index:
                raise MissingImageError(
                    f"image not found: {name} (expected under {root}/images/ or "
                    f"{root}/images_0XX/images/)",
                    **fctx,
                )
            out.append(
                LabeledImage(
                    id=Path(name).stem,
                    image=index[name],
                    labels={c: int(c in found) for c in CHESTXRAY14_CLASSES},
                    dataset="chestxray14",
                    split=split or "all",
                    meta={
                        "image_name": name,
                        "patient_id": row.get("Patient ID", ""),
                        "view_position": row.get("View Position", ""),
                    },
                )
            )
        except DataError as e:
            counter.record(e)
    return counter.finish(out)


# ------------------------------------------------------------------------------------ CheXpert

#: The 13 CheXpert observations other than "No Finding", in the CheXpert labeler's order (also
#: CheXbert's heads, :data:`medtune.eval.chexbert.CONDITIONS`).
CHEXPERT_OBSERVATIONS = (
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)
CHEXPERT_CLASSES = ("No Finding", *CHEXPERT_OBSERVATIONS)
UNCERTAIN_POLICIES = ("ones", "zeros", "ignore")
_CHEXPERT_FILES = {"train": "train.csv", "valid": "valid.csv"}


def _chexpert_image(root: Path, rel: str) -> Path:
    """CSV paths start with the release folder (``CheXpert-v1.0-small/train/...``): accept the
    root being that folder or its parent."""
    direct = root / rel
    if direct.exists():
        return direct
    parts = Path(rel).parts
    return root.joinpath(*parts[1:]) if len(parts) > 1 else direct


def chexpert(
    root: str | Path,
    split: str = "valid",
    uncertain: str = "ones",
    skip_bad_rows: bool = False,
    *,
    classes: tuple[str, ...] = CHEXPERT_CLASSES,
    frontal_only: bool = False,
) -> list[LabeledImage]:
    """Read CheXpert (``CheXpert-v1.0`` or ``-small``) as released.

    Layout::

        root/train.csv, root/valid.csv   Path, Sex, Age, Frontal/Lateral, AP/PA, <14 observations>
        root/train/patient00001/study1/view1_frontal.jpg   (Path is "CheXpert-v1.0-small/train/...")

    Label cells: ``1.0`` positive, ``0.0`` negative, ``-1.0`` uncertain, blank = 0 (not mentioned).

    Args:
        root: the release folder (or its parent).
        split: ``train`` or ``valid``.
        uncertain: the -1 policy: ``ones`` (-> 1), ``zeros`` (-> 0) or ``ignore`` (the class is
            left out of that image's labels).
        skip_bad_rows: count and skip rows with a bad label value or a missing image.
        classes: the observations to read (e.g. the 5 competition ones).
        frontal_only: keep only ``Frontal/Lateral == Frontal`` rows.

    Returns:
        One :class:`LabeledImage` per row; ``id`` is the path without the release folder and
        suffix (``train/patient00001/study1/view1_frontal``).
    """
    if uncertain not in UNCERTAIN_POLICIES:
        raise DataError(f"chexpert: unknown uncertain policy {uncertain!r} ({UNCERTAIN_POLICIES})")
    if split not in _CHEXPERT_FILES:
        raise DataError(f"chexpert: unknown split {split!r} (expected train or valid)")
    root = Path(root)
    if not (root / _CHEXPERT_FILES[split]).is_file() and (root / "CheXpert-v1.0-small").is_dir():
        root = root / "CheXpert-v1.0-small"
    table = root / _CHEXPERT_FILES[split]
    rows = read_csv_rows(table, ("Path", *classes), "the CheXpert label table")
    counter = SkipCounter(f"chexpert {split}", skip_bad_rows)
    out = []
    for i, row in enumerate(rows):
        rel = row["Path"]
        try:
            fctx = {"file": table, "row": i, "row_id": rel, "id_name": "Path"}
            if frontal_only and row.get("Frontal/Lateral", "Frontal") != "Frontal":
                continue
            labels: dict[str, int] = {}
            for c in classes:
                cell = row[c]
                value = {"": 0, "0.0": 0, "0": 0, "1.0": 1, "1": 1, "-1.0": -1, "-1": -1}.get(cell)
                if value is None:
                    raise BadValueError(
                        f"column {c!r} is {cell!r}, expected 1.0, 0.0, -1.0 or blank", **fctx
                    )
                if value == -1:
                    if uncertain == "ignore":
                        continue
                    value = 1 if uncertain == "ones" else 0
                labels[c] = value
            image = _chexpert_image(root, rel)
            if not image.is_file():
                raise MissingImageError(f"image not found: {image}", **fctx)
            rid = str(Path(*Path(rel).parts[1:]).with_suffix("")) if "/" in rel else rel
            out.append(
                LabeledImage(
                    id=rid,
                    image=os.path.abspath(image),
                    labels=labels,
                    dataset="chexpert",
                    split=split,
                    meta={
                        "path": rel,
                        "view": row.get("Frontal/Lateral", ""),
                        "ap_pa": row.get("AP/PA", ""),
                        "uncertain_policy": uncertain,
                    },
                )
            )
        except DataError as e:
            counter.record(e)
    return counter.finish(out)
