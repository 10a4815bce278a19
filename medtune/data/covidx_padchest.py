"""COVIDx CXR and PadChest as MAVL's zero-shot evaluation reads them, from the files users download.

Followed: ``Zero-shot_classification/dataset/dataset.py`` (``CovidCXR2_Dataset``,
``Padchest_Dataset``) and ``test.py`` of HieuPhan33/CVPR2024_MAVL.

- **COVIDx** (CXR-2 / CXR-3 / CXR-4): ``test.txt`` (MAVL ships the CXR-2 subset as
  ``data/covidx-cxr2/test_split.csv`` in the same layout), one image per line
  ``patient_id filename label source``, space separated, ``label`` ``positive`` or ``negative``;
  images at ``image_dir/filename``. One class, ``COVID-19`` (MAVL: ``class == 'positive'``), scored
  by MAVL's ``covid19`` entity (``covid_cls``; the entity is added to the model with its books).
- **PadChest**: ``PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv`` (``ImageID``,
  ``ImageDir``, ``Labels`` = a Python list literal of label strings, ``Projection``, ...); images
  at ``image_root/<ImageDir>/<ImageID>`` (or ``image_root/<ImageID>`` in a flat copy). MAVL reads a
  preprocessed ``data/padchest/test.csv`` (one 0/1 column per class) that its repository does not
  publish, so the rule here is the closest documented one: class ``c`` is 1 when the image's
  ``Labels`` hold the PadChest label ``c`` (case and surrounding spaces ignored), 0 otherwise.
  MAVL's class lists (``test.py``) are :data:`PADCHEST_SEEN` (its README's "PadChest-seen" table),
  :data:`PADCHEST_RARE` and :data:`PADCHEST_UNSEEN`. Two names of MAVL's seen list are not PadChest
  labels verbatim: ``pleural effusion`` is MAVL's ``effusion`` entity (``test.py`` renames it;
  :data:`medtune.eval.mavl_zero_shot.DATASET_ENTITY_MAP`), and ``edema`` is read from PadChest's
  ``pulmonary edema`` label (PadChest has no plain ``edema``; :data:`PADCHEST_LABEL_ALIASES`).
  Rows with an empty ``Labels`` cell (the release has some) are left out and counted in a warning
  line, as the usual PadChest preprocessing (KAD, CheXzero) drops them. 16-bit PNGs are scaled
  min-max by :func:`medtune.data.images.load_image` (MAVL: ``img / img.max() * 255``).

Both return :class:`~medtune.data.labeled.LabeledImage` items. Import-light: standard library only.
"""

from __future__ import annotations

import ast
import logging
import os
from pathlib import Path

from medtune.data.errors import BadValueError, DataError, MissingFieldError, MissingImageError
from medtune.data.labeled import LabeledImage
from medtune.data.rows import SkipCounter
from medtune.data.tables import read_csv_rows

__all__ = [
    "PADCHEST_LABEL_ALIASES",
    "PADCHEST_RARE",
    "PADCHEST_SEEN",
    "PADCHEST_UNSEEN",
    "covidx",
    "padchest",
]

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------- COVIDx

_COVIDX_LABELS = {"positive": 1, "negative": 0}


def covidx(
    test_file: str | Path, image_dir: str | Path, skip_bad_rows: bool = False
) -> list[LabeledImage]:
    """Read a COVIDx CXR split file (``patient_id filename label source`` per line).

    Args:
        test_file: ``test.txt`` (or ``val.txt``, MAVL's ``test_split.csv``).
        image_dir: the folder holding the split's images (COVIDx CXR-4: ``test/``).
        skip_bad_rows: count and skip bad lines and missing images instead of stopping.

    Returns:
        One item per line, ``labels = {"COVID-19": 0|1}``, ``meta`` with patient id and source.
    """
    path, folder = Path(test_file), Path(image_dir)
    if not path.is_file():
        raise DataError(
            f"file not found: {path} (expected a COVIDx split file)", reason="missing file"
        )
    counter, out = SkipCounter(f"covidx {path.name}", skip_bad_rows), []
    for i, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines()):
        if not line.strip():
            continue
        fctx = {"file": path, "row": i + 1}
        try:
            fields = line.split()
            if len(fields) < 4:
                raise BadValueError(
                    f"line {line.strip()!r}: expected 'patient_id filename label source'", **fctx
                )
            # file names with spaces: the patient id is first, label and source are last
            pid, label, source = fields[0], fields[-2], fields[-1]
            name = " ".join(fields[1:-2])
            if label.lower() not in _COVIDX_LABELS:
                raise BadValueError(f"label is {label!r}, expected positive or negative (COVIDx CXR-2/3/4)",
                                    row_id=name, id_name="filename", **fctx)  # fmt: skip
            image = folder / name
            if not image.is_file():
                raise MissingImageError(
                    f"image not found: {image}", row_id=name, id_name="filename", **fctx
                )
            out.append(LabeledImage(id=Path(name).stem, image=os.path.abspath(image),
                                    labels={"COVID-19": _COVIDX_LABELS[label.lower()]}, dataset="covidx",
                                    split=path.stem, meta={"patient_id": pid, "source": source}))  # fmt: skip
        except DataError as e:
            counter.record(e)
    return counter.finish(out)


# --------------------------------------------------------------------------------------- PadChest

#: MAVL's ``padchest_seen_class`` (``test.py``), in its order.
PADCHEST_SEEN = (
    "normal", "pleural effusion", "pacemaker", "atelectasis", "pneumonia", "consolidation",
    "cardiomegaly", "emphysema", "nodule", "edema", "pneumothorax", "fracture", "mass", "catheter",
)  # fmt: skip
#: MAVL's ``padchest_rare`` (``test.py``; its commented-out ``consolidation`` left out as there).
PADCHEST_RARE = (
    "suture material", "sternotomy", "supra aortic elongation", "metal", "abnormal foreign body",
    "central venous catheter via jugular vein", "vertebral anterior compression",
    "diaphragmatic eventration", "calcified densities", "volume loss", "single chamber device",
    "vertebral compression", "bullas", "axial hyperostosis", "aortic button enlargement",
    "calcified granuloma", "clavicle fracture", "dual chamber device", "mediastinic lipomatosis",
    "esophagic dilatation", "azygoesophageal recess shift", "breast mass", "round atelectasis",
    "surgery humeral", "aortic aneurysm", "nephrostomy tube", "sternoclavicular junction hypertrophy",
    "pulmonary artery hypertension", "pleural mass", "empyema", "external foreign body",
    "respiratory distress", "total atelectasis", "ventriculoperitoneal drain tube",
    "right sided aortic arch", "aortic endoprosthesis", "cyst", "pulmonary venous hypertension",
    "double J stent",
)  # fmt: skip
_UNSEEN_ONLY = (
    "hypoexpansion basal", "non axial articular degenerative changes", "multiple nodules",
    "COPD signs", "mediastinal shift", "hiatal hernia", "central venous catheter",
    "ground glass pattern", "surgery lung", "miliary opacities", "sclerotic bone lesion",
    "pleural plaques", "osteosynthesis material", "calcified mediastinal adenopathy",
    "apical pleural thickening", "aortic elongation", "major fissure thickening",
    "callus rib fracture", "cervical rib", "loculated pleural effusion", "flattened diaphragm",
)  # fmt: skip
#: MAVL's ``padchest_unseen_class`` (its own list + the rare list, de-duplicated; MAVL takes
#: ``list(set(...))``, whose order varies between runs: here its list order, then the rare ones).
PADCHEST_UNSEEN = (*_UNSEEN_ONLY, *PADCHEST_RARE)
#: A class name of MAVL's lists -> the PadChest label(s) it is read from, where they differ.
PADCHEST_LABEL_ALIASES: dict[str, tuple[str, ...]] = {"edema": ("pulmonary edema",)}
_PRESETS = {"seen": PADCHEST_SEEN, "rare": PADCHEST_RARE, "unseen": PADCHEST_UNSEEN}


def _parse_labels(cell: str, fctx: dict) -> set[str]:
    try:
        value = ast.literal_eval(cell)
    except (ValueError, SyntaxError):
        value = None
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise BadValueError(f"Labels is {cell[:80]!r}, expected a list of label strings like "
                            "['pleural effusion', 'cardiomegaly']", **fctx)  # fmt: skip
    return {v.strip().lower() for v in value if v.strip()}


def padchest(
    csv_file: str | Path,
    image_root: str | Path,
    classes: str | list[str] | tuple[str, ...] = "seen",
    projections: list[str] | tuple[str, ...] | None = None,
    image_ids: str | Path | None = None,
    skip_bad_rows: bool = False,
) -> list[LabeledImage]:
    """Read PadChest's label table (see the module docstring for the rule).

    Args:
        csv_file: ``PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv`` (``.gz`` allowed).
        image_root: the folder holding ``<ImageDir>/<ImageID>`` (or all images flat).
        classes: ``seen`` / ``rare`` / ``unseen`` (MAVL's lists) or a list of PadChest labels.
        projections: keep only these ``Projection`` values (e.g. ``[PA, AP, AP_horizontal]``);
            None: every row.
        image_ids: a text file of ``ImageID`` s, one per line (a fixed evaluation subset); None: all.
        skip_bad_rows: count and skip bad rows and missing images instead of stopping.

    Returns:
        One item per kept row, ``labels`` = ``{class: 0|1}`` for every class, in the table's order.
    """
    if isinstance(classes, str):
        if classes not in _PRESETS:
            raise DataError(
                f"padchest: classes {classes!r}: expected one of {sorted(_PRESETS)} or a list"
            )
        classes = _PRESETS[classes]
    classes = tuple(classes)
    path, root = Path(csv_file), Path(image_root)
    rows = read_csv_rows(
        path, ("ImageID", "ImageDir", "Labels", "Projection"), "the PadChest label table"
    )
    keep = None
    if image_ids is not None:
        if not Path(image_ids).is_file():
            raise DataError(f"file not found: {image_ids} (expected ImageIDs, one per line)",
                            reason="missing file")  # fmt: skip
        keep = {s.strip() for s in Path(image_ids).read_text().splitlines() if s.strip()}
    wanted = {c: {a.lower() for a in PADCHEST_LABEL_ALIASES.get(c, (c,))} for c in classes}
    counter, out, unlabeled = SkipCounter(f"padchest {path.name}", skip_bad_rows), [], 0
    for i, row in enumerate(rows):
        iid = row["ImageID"]
        if (keep is not None and iid not in keep) or (
            projections and row["Projection"] not in projections
        ):
            continue
        fctx = {"file": path, "row": i, "row_id": iid, "id_name": "ImageID"}
        try:
            if not iid:
                raise MissingFieldError("empty ImageID", **fctx)
            if not row["Labels"] or row["Labels"].lower() == "nan":
                unlabeled += 1
                continue
            found = _parse_labels(row["Labels"], fctx)
            image = root / row["ImageDir"] / iid
            if not image.is_file() and (root / iid).is_file():
                image = root / iid
            if not image.is_file():
                raise MissingImageError(f"image not found: {image}", **fctx)
            labels = {c: int(bool(found & names)) for c, names in wanted.items()}
            out.append(LabeledImage(id=Path(iid).stem, image=os.path.abspath(image), labels=labels,
                                    dataset="padchest", split=path.stem,
                                    meta={"projection": row["Projection"], "labels": sorted(found)}))  # fmt: skip
        except DataError as e:
            counter.record(e)
    if unlabeled:
        logger.warning("padchest: %d rows of %s have no Labels and are left out", unlabeled, path)
    return counter.finish(out)
