"""Kaggle chest X-ray challenge readers: RSNA Pneumonia Detection and SIIM-ACR Pneumothorax, read
for image classification (one :class:`~medtune.data.labeled.LabeledImage` per image).

Re-exported by :mod:`medtune.data.classification` (the readers' documented home). Import-light:
standard library only.
"""

from __future__ import annotations

import os
from pathlib import Path

from medtune.data.errors import BadValueError, DataError, MissingFieldError, MissingImageError
from medtune.data.labeled import LabeledImage
from medtune.data.rows import SkipCounter
from medtune.data.tables import read_csv_rows

__all__ = ["rsna_pneumonia", "siim_acr"]


def rsna_pneumonia(root: str | Path, skip_bad_rows: bool = False) -> list[LabeledImage]:
    """Read the RSNA Pneumonia Detection Challenge (Kaggle) stage 2 training set.

    Layout::

        root/stage_2_train_labels.csv   patientId, x, y, width, height, Target (one row per box;
                                        Target 0 rows have no box)
        root/stage_2_train_images/<patientId>.dcm

    Returns:
        One :class:`LabeledImage` per patient (first-appearance order), ``labels =
        {"Pneumonia": 1}`` if any of its rows has Target 1, else 0; ``meta["boxes"]`` holds the
        boxes ``[x, y, width, height]``. ``split`` is ``"train"`` (the only labelled set).
    """
    root = Path(root)
    table = root / "stage_2_train_labels.csv"
    rows = read_csv_rows(table, ("patientId", "Target"), "the RSNA label table")
    patients: dict[str, dict] = {}
    counter = SkipCounter("rsna_pneumonia", skip_bad_rows)
    for i, row in enumerate(rows):
        pid = row["patientId"]
        try:
            if not pid:
                raise MissingFieldError("empty patientId", file=table, row=i)
            if row["Target"] not in ("0", "1"):
                raise BadValueError(
                    f"Target is {row['Target']!r}, expected 0 or 1",
                    file=table,
                    row=i,
                    row_id=pid,
                    id_name="patientId",
                )
            p = patients.setdefault(pid, {"row": i, "target": 0, "boxes": []})
            if row["Target"] == "1":
                p["target"] = 1
                box = [row.get(k, "") for k in ("x", "y", "width", "height")]
                if all(box):
                    p["boxes"].append([float(v) for v in box])
        except DataError as e:
            counter.record(e)
    out = []
    folder = root / "stage_2_train_images"
    for pid, p in patients.items():
        try:
            image = folder / f"{pid}.dcm"
            if not image.is_file():
                raise MissingImageError(
                    f"image not found: {image}", file=table, row=p["row"], row_id=pid,
                    id_name="patientId",
                )  # fmt: skip
            out.append(
                LabeledImage(
                    id=pid,
                    image=os.path.abspath(image),
                    labels={"Pneumonia": p["target"]},
                    dataset="rsna_pneumonia",
                    split="train",
                    meta={"boxes": p["boxes"]},
                )
            )
        except DataError as e:
            counter.record(e)
    return counter.finish(out)


def siim_acr(
    root: str | Path, skip_bad_rows: bool = False, *, image_dir: str = "dicom-images-train"
) -> list[LabeledImage]:
    """Read SIIM-ACR Pneumothorax Segmentation (Kaggle) for classification.

    Layout::

        root/train-rle.csv   ImageId, EncodedPixels ("-1" = no mask; one row per mask)
        root/dicom-images-train/<study>/<series>/<ImageId>.dcm   (found recursively)

    Returns:
        One :class:`LabeledImage` per ImageId (first-appearance order), ``labels =
        {"Pneumothorax": 1}`` if any of its rows has a mask, else 0; ``meta["n_masks"]``.
        ``split`` is ``"train"``.
    """
    root = Path(root)
    table = root / "train-rle.csv"
    rows = read_csv_rows(table, ("ImageId", "EncodedPixels"), "the SIIM-ACR mask table")
    folder = root / image_dir
    if not folder.is_dir():
        raise DataError(f"no folder {folder} (expected the DICOM tree)", reason="missing file")
    dicoms = {p.stem: p for p in folder.rglob("*.dcm")}
    images: dict[str, dict] = {}
    counter = SkipCounter("siim_acr", skip_bad_rows)
    for i, row in enumerate(rows):
        try:
            iid, rle = row["ImageId"], row["EncodedPixels"]
            if not iid or not rle:
                raise MissingFieldError(
                    "expected an ImageId and EncodedPixels ('-1' for no mask)", file=table, row=i
                )
            entry = images.setdefault(iid, {"row": i, "n_masks": 0})
            if rle != "-1":
                entry["n_masks"] += 1
        except DataError as e:
            counter.record(e)
    out = []
    for iid, entry in images.items():
        try:
            if iid not in dicoms:
                raise MissingImageError(
                    f"image not found: no {iid}.dcm under {folder}", file=table, row=entry["row"],
                    row_id=iid, id_name="ImageId",
                )  # fmt: skip
            out.append(
                LabeledImage(
                    id=iid,
                    image=os.path.abspath(dicoms[iid]),
                    labels={"Pneumothorax": int(entry["n_masks"] > 0)},
                    dataset="siim_acr",
                    split="train",
                    meta={"n_masks": entry["n_masks"]},
                )
            )
        except DataError as e:
            counter.record(e)
    return counter.finish(out)
