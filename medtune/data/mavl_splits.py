"""RSNA Pneumonia and SIIM-ACR with the train / val / test splits of MAVL's data files.

MAVL (HieuPhan33/CVPR2024_MAVL) ships its splits as CSV files (``data/rsna/{train,val,test}.csv``,
``data/siimacr/{train,val,test}.csv``), read by ``Zero-shot_grounding/dataset/dataset.py`` and the
fine-tuning datasets:

- RSNA: ``ID, img_path, boxes, classes``: ``img_path`` relative to the image root (MD.ai DICOM
  tree), ``boxes`` = ``"x;y;w;h|x;y;w;h"`` (empty when ``classes`` is 0), ``classes`` 0 or 1.
- SIIM-ACR: ``ImageId, EncodedPixels`` (Kaggle run-length mask, ``-1`` = none; one row per mask).
  MAVL reads pre-converted ``processed_images/<ImageId>.png``; here ``image_dir`` names that
  folder, or the Kaggle DICOM tree (``dicom-images-train``, searched recursively for
  ``<ImageId>.dcm``).

Both return :class:`~medtune.data.labeled.LabeledImage` items (``Pneumonia`` / ``Pneumothorax``),
with ``meta["boxes"]`` (RSNA, pixels of the original image) or ``meta["rles"]`` (SIIM), which
:mod:`medtune.eval.grounding` turns into masks.
"""

from __future__ import annotations

from pathlib import Path

from medtune.data.errors import BadValueError, DataError, MissingImageError
from medtune.data.labeled import LabeledImage
from medtune.data.rows import SkipCounter
from medtune.data.tables import read_csv_rows


def mavl_rsna(csv_file: str, root: str, skip_bad_rows: bool = False) -> list[LabeledImage]:
    """MAVL's RSNA split file -> one item per row (``labels = {"Pneumonia": 0|1}``, ``meta["boxes"]``)."""
    path, root_p = Path(csv_file), Path(root)
    rows = read_csv_rows(path, ("ID", "img_path", "boxes", "classes"), "MAVL's RSNA split file")
    counter, out = SkipCounter("mavl_rsna", skip_bad_rows), []
    for i, row in enumerate(rows):
        try:
            if row["classes"] not in ("0", "1"):
                raise BadValueError(f"classes is {row['classes']!r}, expected 0 or 1", file=path, row=i,
                                    row_id=row["ID"], id_name="ID")  # fmt: skip
            boxes = []
            for box in filter(None, row["boxes"].split("|")):
                vals = box.split(";")
                try:
                    boxes.append([float(v) for v in vals])
                except ValueError:
                    vals = []
                if len(vals) != 4:
                    raise BadValueError(f"box {box!r}: expected x;y;w;h", file=path, row=i, row_id=row["ID"],
                                        id_name="ID")  # fmt: skip
            image = root_p / row["img_path"]
            if not image.is_file():
                raise MissingImageError(f"image {image} not found", file=path, row=i, row_id=row["ID"],
                                        id_name="ID")  # fmt: skip
            out.append(LabeledImage(id=row["ID"], image=str(image), labels={"Pneumonia": int(row["classes"])},
                                    dataset="rsna_pneumonia", split=path.stem, meta={"boxes": boxes}))  # fmt: skip
        except DataError as e:
            counter.record(e)
    return list(counter.finish(out))


def mavl_siim(
    csv_file: str, root: str, image_dir: str = "processed_images", skip_bad_rows: bool = False
) -> list[LabeledImage]:
    """MAVL's SIIM-ACR split file -> one item per ImageId (``labels = {"Pneumothorax": 0|1}``,
    ``meta["rles"]`` the image's run-length strings)."""
    path, folder = Path(csv_file), Path(root) / image_dir
    rows = read_csv_rows(path, ("ImageId", "EncodedPixels"), "MAVL's SIIM-ACR split file")
    if not folder.is_dir():
        raise DataError(f"no folder {folder} (expected the SIIM-ACR images)", reason="missing file")
    dicoms = None
    images: dict[str, dict] = {}
    counter = SkipCounter("mavl_siim", skip_bad_rows)
    for i, row in enumerate(rows):
        try:
            iid, rle = row["ImageId"], row["EncodedPixels"].strip()
            if not iid or not rle:
                raise BadValueError(
                    "expected an ImageId and EncodedPixels ('-1' for no mask)", file=path, row=i
                )
            entry = images.setdefault(iid, {"row": i, "rles": []})
            if rle != "-1":
                entry["rles"].append(rle)
        except DataError as e:
            counter.record(e)
    out = []
    for iid, entry in images.items():
        try:
            image = folder / f"{iid}.png"
            if not image.is_file():
                if dicoms is None:
                    dicoms = {p.stem: p for p in folder.rglob("*.dcm")}
                image = dicoms.get(iid)
            if image is None or not Path(image).is_file():
                raise MissingImageError(f"no image {iid}.png or {iid}.dcm under {folder}", file=path,
                                        row=entry["row"], row_id=iid, id_name="ImageId")  # fmt: skip
            out.append(LabeledImage(id=iid, image=str(image), labels={"Pneumothorax": int(bool(entry["rles"]))},
                                    dataset="siim_acr", split=path.stem, meta={"rles": entry["rles"]}))  # fmt: skip
        except DataError as e:
            counter.record(e)
    return list(counter.finish(out))
