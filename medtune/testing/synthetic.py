"""A synthetic medical VQA set in SLAKE's exact schema, whose answers depend only on the image.

Each image is a 64x64 "scan": a body outline whose rendering tells the modality (CT: grey body on
black; MRI: bright rim and textured body; X-ray: inverted, light background), with or without a
bright round lesion in one quadrant. Questions per image (SLAKE wording and fields):

- ``Which side is the lesion on?`` -> ``left`` | ``right`` (radiological convention: the patient's
  left is on the image's right), OPEN, content_type Position;
- ``Is the lesion in the upper or lower part?`` -> ``upper`` | ``lower``, CLOSED, Position;
- ``Does this image contain a lesion?`` -> ``yes`` | ``no``, CLOSED, Abnormality;
- ``What modality is shown?`` -> ``ct`` | ``mri`` | ``x ray``, OPEN, Modality.

A question-only model can do no better than each question's majority answer; a model that sees the
image can answer all of them. Each split also gets two real DICOM images with modality questions,
so the DICOM path is exercised: a different region of pydicom's ``CT_small.dcm`` and
``MR_small.dcm`` per split (:func:`split_dicom`), so that no image is shared between splits
(``tools/check_split_leakage.py`` finds no leak).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
from PIL import Image

MODALITIES = {"CT": "ct", "MRI": "mri", "X-Ray": "x ray"}
LOCATIONS = ["Lung", "Abdomen", "Brain"]


def render_scan(
    modality: str, lesion: tuple[str, str] | None, rng: np.random.Generator, size: int = 64
) -> np.ndarray:
    """Render one synthetic scan.

    Args:
        modality: ``"CT" | "MRI" | "X-Ray"``.
        lesion: ``(image_side, part)`` with image_side ``"left" | "right"`` (of the picture) and part
            ``"upper" | "lower"``, or None for no lesion.
        rng: random generator (noise, jitter).
        size: image side in pixels.

    Returns:
        uint8 array [size, size].
    """
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1)
    body = ((xx - 0.5) / 0.42) ** 2 + ((yy - 0.5) / 0.46) ** 2 <= 1.0
    img = np.zeros((size, size), np.float32)
    if modality == "CT":
        img[body] = 0.45
    elif modality == "MRI":
        rim = body & (((xx - 0.5) / 0.36) ** 2 + ((yy - 0.5) / 0.40) ** 2 > 1.0)
        img[body] = 0.30 + 0.10 * np.sin(xx[body] * 40)
        img[rim] = 0.85
    else:  # X-ray: light background, darker body
        img[:] = 0.8
        img[body] = 0.35
    if lesion is not None:
        side, part = lesion
        cx = (0.30 if side == "left" else 0.70) + rng.uniform(-0.06, 0.06)
        cy = (0.30 if part == "upper" else 0.70) + rng.uniform(-0.06, 0.06)
        r = rng.uniform(0.08, 0.12)
        blob = (xx - cx) ** 2 + (yy - cy) ** 2 <= r**2
        img[blob] = 1.0 if modality != "X-Ray" else 0.05
    img += rng.normal(0, 0.03, img.shape).astype(np.float32)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def _row(
    img_id: int,
    img_name: str,
    qid: int,
    question: str,
    answer: str,
    answer_type: str,
    content_type: str,
    modality: str,
    location: str,
) -> dict:
    return {
        "img_id": img_id,
        "img_name": img_name,
        "question": question,
        "answer": answer,
        "q_lang": "en",
        "location": location,
        "modality": modality,
        "answer_type": answer_type,
        "base_type": "vqa",
        "content_type": content_type,
        "triple": ["vhead", "_", "_"],
        "qid": qid,
    }


def _questions(
    img_id: int, img_name: str, qid: int, modality: str, lesion, location: str
) -> list[dict]:
    # (question, answer, answer_type, content_type), qids counting up from ``qid``
    asked = [
        ("Does this image contain a lesion?", "yes" if lesion else "no", "CLOSED", "Abnormality"),
        ("What modality is shown?", MODALITIES[modality], "OPEN", "Modality"),
    ]
    if lesion:
        image_side, part = lesion
        patient_side = "left" if image_side == "right" else "right"  # radiological convention
        asked += [
            ("Which side is the lesion on?", patient_side, "OPEN", "Position"),
            ("Is the lesion in the upper or lower part?", part, "CLOSED", "Position"),
        ]
    return [
        _row(img_id, img_name, qid + k, q, a, at, ct, modality, location)
        for k, (q, a, at, ct) in enumerate(asked)
    ]


def write_synthetic_slake(
    root: str | Path,
    *,
    n_train: int = 384,
    n_val: int = 96,
    n_test: int = 96,
    seed: int = 0,
    image_size: int = 64,
    with_dicom: bool = True,
) -> Path:
    """Write ``root/{train,validation,test}.json`` and ``root/imgs/xmlab<N>/source.png``.

    Args:
        root: the ``Slake1.0`` folder to create.
        n_train, n_val, n_test: approximate number of question rows per split (whole images).
        seed: makes the folder byte-for-byte reproducible.
        image_size: rendered image side.
        with_dicom: also add pydicom's CT_small/MR_small as images with modality questions.

    Returns:
        ``root``.
    """
    root = Path(root)
    (root / "imgs").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pyrng = random.Random(seed)
    img_id, qid = 0, 0
    for split, n_rows in (("train", n_train), ("validation", n_val), ("test", n_test)):
        rows: list[dict] = []
        while len(rows) < n_rows:
            modality = pyrng.choice(list(MODALITIES))
            lesion = (
                None
                if pyrng.random() < 0.25
                else (pyrng.choice(["left", "right"]), pyrng.choice(["upper", "lower"]))
            )
            name = f"xmlab{img_id}/source.png"
            (root / "imgs" / f"xmlab{img_id}").mkdir(exist_ok=True)
            Image.fromarray(render_scan(modality, lesion, rng, image_size)).save(
                root / "imgs" / name
            )
            rows += _questions(img_id, name, qid, modality, lesion, pyrng.choice(LOCATIONS))
            img_id += 1
            qid += 4
        if with_dicom:
            rows += _dicom_rows(root, split, img_id, qid)
            img_id += 2
            qid += 2
        (root / f"{split}.json").write_text(json.dumps(rows, indent=1, ensure_ascii=False))
    return root


#: Where each split's DICOM images are cut from pydicom's files: (top, left) of a 3/4-size crop.
#: Each split gets its own region, so no split shares pixels with another (the leakage check
#: compares decoded pixels), and the images stay real DICOM files of the original series.
DICOM_CROPS = {"train": (0.0, 0.0), "validation": (0.5, 0.5), "test": (1.0, 1.0)}


def split_dicom(src: str | Path, dst: str | Path, split: str) -> Path:
    """Write ``split``'s crop of the DICOM ``src`` to ``dst`` (see :data:`DICOM_CROPS`).

    The crop is 3/4 of each side, at the split's relative offset; Rows / Columns, the pixel data
    and a new SOP Instance UID (derived from file and split, so the output is reproducible) are
    set; every other element (modality, rescale, window, patient) is kept.
    """
    import pydicom
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(src)
    arr = ds.pixel_array
    h, w = arr.shape
    ch, cw = (3 * h) // 4, (3 * w) // 4
    fy, fx = DICOM_CROPS[split]
    top, left = round(fy * (h - ch)), round(fx * (w - cw))
    crop = np.ascontiguousarray(arr[top : top + ch, left : left + cw])
    ds.PixelData = crop.astype(arr.dtype).tobytes()  # explicit VR little endian, as the source
    ds.Rows, ds.Columns = crop.shape
    uid = generate_uid(entropy_srcs=[Path(src).name, split])
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.save_as(dst)
    return Path(dst)


def _dicom_rows(root: Path, split: str, img_id: int, qid: int) -> list[dict]:
    from pydicom.data import get_testdata_file

    rows = []
    for i, (fname, modality) in enumerate((("CT_small.dcm", "CT"), ("MR_small.dcm", "MRI"))):
        name = f"xmlab{img_id + i}/source.dcm"
        (root / "imgs" / f"xmlab{img_id + i}").mkdir(exist_ok=True)
        split_dicom(get_testdata_file(fname), root / "imgs" / name, split)
        rows.append(
            _row(
                img_id + i,
                name,
                qid + i,
                "What modality is shown?",
                MODALITIES[modality],
                "OPEN",
                "Modality",
                modality,
                "Brain",
            )
        )
    return rows


def describe(modality: str, lesion: tuple[str, str] | None) -> str:
    """The words a radiologist would use for a rendered scan (patient-side convention)."""
    if lesion is None:
        return f"{MODALITIES[modality]} scan, normal, no lesion."
    image_side, part = lesion
    patient_side = "left" if image_side == "right" else "right"
    return f"{MODALITIES[modality]} scan, lesion in the {part} {patient_side} region."


def text_qa_corpus(n_images: int, seed: int = 1) -> list[tuple[str, str, str]]:
    """(description, question, answer) triples over random scans, for pre-training the tiny LLM on
    text, so that it "knows" the task the way a real instruction-tuned LLM knows medicine."""
    rng = random.Random(seed)
    out = []
    for _ in range(n_images):
        modality = rng.choice(list(MODALITIES))
        lesion = (
            None
            if rng.random() < 0.25
            else (rng.choice(["left", "right"]), rng.choice(["upper", "lower"]))
        )
        desc = describe(modality, lesion)
        for row in _questions(0, "", 0, modality, lesion, "Lung"):
            out.append((desc, row["question"], row["answer"]))
    return out
