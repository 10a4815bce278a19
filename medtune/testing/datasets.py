"""Tiny on-disk copies of SLAKE and VQA-RAD with the real layouts and quirks (for tests).

The folders copy what users download, quirks included, so readers, converters, the leakage check
and evaluation are tested against the real shape of the data:

SLAKE (:func:`make_slake_fixture` -> ``<root>/Slake1.0``)::

    Slake1.0/train.json  validation.json  test.json
    Slake1.0/imgs/xmlab<N>/source.jpg  (+ mask.png, as in the release)

- rows carry every SLAKE field: img_id, img_name, question, answer, q_lang, location, modality,
  answer_type, base_type, content_type, triple, qid; English and Chinese rows in every split;
- closed answers that are not yes/no (``Left``, ``Right``, ``T1``, ``T2``, ``None``);
- one English test row has an empty answer (as in the release);
- a Chinese *train* row asks about ``xmlab5``, an English *test* image (leak by file name), and
  ``xmlab7`` (test) is a byte-identical copy of ``xmlab1`` (train) under another name (leak by
  pixels only).

VQA-RAD (:func:`make_vqa_rad_fixture` -> ``<root>/VQA_RAD``)::

    VQA_RAD/VQA_RAD Dataset Public.json
    VQA_RAD/VQA_RAD Image Folder/synpic<N>.jpg

- the OSF fields: qid, phrase_type (freeform / para / test_freeform / test_para), qid_linked_id,
  image_case_url, image_name, image_organ, evaluation, question, question_rephrase,
  question_relation, question_frame, question_type, answer, answer_type;
- ``answer_type`` with stray whitespace (``"CLOSED "``), integer answers (``2``);
- test questions ask about an image that train questions also use (leak by file name).

Images are synthetic (PIL + numpy, deterministic): what each answer says is drawn in the image (a
bright lesion on the patient's left or right, a count of nodules, a modality-specific texture),
so a model can in principle learn the task. All numbers below are what the readers must return.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "make_slake_fixture",
    "make_vqa_rad_fixture",
    "SLAKE_FIXTURE_COUNTS",
    "VQA_RAD_FIXTURE_COUNTS",
    "make_medical_image",
    "save_xray",
]

_SIZE = 64


def save_xray(path: Path, seed: int, size: int = 32) -> None:
    """Write a synthetic ``size`` px X-ray (:func:`make_medical_image`) to ``path`` (any PIL format,
    by suffix), creating its folder: the image of the classification and report fixtures."""
    path.parent.mkdir(parents=True, exist_ok=True)
    make_medical_image(seed, modality="X-Ray", size=size).save(path)


def make_medical_image(
    seed: int,
    *,
    modality: str = "CT",
    lesion: str | None = None,
    nodules: int = 0,
    size: int = _SIZE,
) -> Image.Image:
    """A deterministic synthetic scan.

    Args:
        seed: noise seed.
        modality: ``CT`` (round body, grey), ``MRI`` (brighter, striped), ``X-Ray`` (dark ribs).
        lesion: ``"left"`` / ``"right"`` (patient's side: shown on the image's *right* / *left*,
            radiological convention) or None.
        nodules: number of small bright dots in a row at the bottom.
        size: side in pixels.

    Returns:
        RGB ``PIL.Image.Image`` of ``size x size``.
    """
    rng = np.random.RandomState(seed)
    a = rng.normal(20, 6, (size, size))
    yy, xx = np.mgrid[:size, :size]
    body = ((xx - size / 2) / (size * 0.42)) ** 2 + ((yy - size / 2) / (size * 0.36)) ** 2 <= 1
    base = {"CT": 110.0, "MRI": 150.0, "X-Ray": 60.0}.get(modality, 100.0)
    a[body] += base
    if modality == "MRI":
        a[body & ((yy // 4) % 2 == 0)] += 25
    elif modality == "X-Ray":
        a[body & ((yy // 6) % 3 == 0)] += 90
    if lesion is not None:
        cx = size * (0.7 if lesion == "left" else 0.3)  # patient's left is the image's right
        a[(xx - cx) ** 2 + (yy - size * 0.45) ** 2 <= (size * 0.09) ** 2] = 250
    for k in range(nodules):
        cx = size * (0.3 + 0.2 * k)
        a[(xx - cx) ** 2 + (yy - size * 0.75) ** 2 <= (size * 0.04) ** 2] = 240
    a = np.clip(a, 0, 255).astype(np.uint8)
    return Image.fromarray(np.stack([a, a, a], axis=-1), mode="RGB")


def _mask(img: Image.Image) -> Image.Image:
    m = Image.new("L", img.size, 0)
    ImageDraw.Draw(m).ellipse((8, 10, img.size[0] - 8, img.size[1] - 10), fill=255)
    return m


# ------------------------------------------------------------------------------------------ SLAKE

# img_id -> (modality, location, lesion side, MRI sequence)
_SLAKE_IMAGES = {
    0: ("CT", "Abdomen", "left", None),
    1: ("MRI", "Brain", "right", "T2"),
    2: ("X-Ray", "Chest", None, None),
    3: ("CT", "Lung", "right", None),
    4: ("MRI", "Brain", "left", "T1"),
    5: ("CT", "Abdomen", "right", None),
    6: ("X-Ray", "Chest", "left", None),
}
# xmlab7 is a byte-identical copy of xmlab1 (pixel-hash leak between train and test).
_SLAKE_COPY = {7: 1}
_SLAKE_SPLIT_IMAGES = {"train": [0, 1, 2, 3], "validation": [4], "test": [5, 6, 7]}
_SLAKE_ZH_IMAGES = {0, 4, 5}  # images that also get Chinese questions in their own split

#: English / Chinese question counts per split returned by :func:`medtune.data.slake`.
SLAKE_FIXTURE_COUNTS = {
    "train": {"en": 16, "zh": 5},
    "validation": {"en": 4, "zh": 2},
    "test": {"en": 13, "zh": 2},
}


def _slake_questions(img_id: int) -> list[tuple[str, str, str, str, str]]:
    """(lang, question, answer, answer_type, content_type) for one image."""
    modality, location, lesion, seq = _SLAKE_IMAGES[_SLAKE_COPY.get(img_id, img_id)]
    q = [
        ("en", "Which modality is used to take this image?", modality, "OPEN", "Modality"),
        ("en", "Is this image abnormal?", "Yes" if lesion else "No", "CLOSED", "Abnormality"),
        (
            "en",
            "Where is the abnormality located, left or right?",
            lesion.capitalize() if lesion else "None",
            "CLOSED",
            "Position",
        ),
        ("en", f"Does the picture contain the {location.lower()}?", "Yes", "CLOSED", "Organ"),
    ]
    if seq is not None:
        q[0] = ("en", "Is this a T1 weighted or T2 weighted MRI image?", seq, "CLOSED", "Modality")
    return q


def _slake_zh(img_id: int) -> list[tuple[str, str, str, str, str]]:
    modality, _, lesion, _ = _SLAKE_IMAGES[_SLAKE_COPY.get(img_id, img_id)]
    side = {"left": "左", "right": "右", None: "无"}[lesion]
    return [
        ("zh", "这张图片的成像方式是什么?", modality, "OPEN", "Modality"),
        ("zh", "病灶位于哪一侧?", side, "CLOSED", "Position"),
    ]


def make_slake_fixture(root: str | Path) -> Path:
    """Write a miniature SLAKE (Slake1.0) under ``root`` and return the ``Slake1.0`` folder.

    Args:
        root: parent folder (created if needed).

    Returns:
        ``root/Slake1.0`` (pass it, or ``root``, to :func:`medtune.data.slake`).
    """
    base = Path(root) / "Slake1.0"
    imgs = base / "imgs"
    for img_id, (modality, _, lesion, _) in _SLAKE_IMAGES.items():
        folder = imgs / f"xmlab{img_id}"
        folder.mkdir(parents=True, exist_ok=True)
        img = make_medical_image(100 + img_id, modality=modality, lesion=lesion)
        img.save(folder / "source.jpg", quality=95)
        _mask(img).save(folder / "mask.png")
    for dst, src in _SLAKE_COPY.items():
        folder = imgs / f"xmlab{dst}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "source.jpg").write_bytes((imgs / f"xmlab{src}" / "source.jpg").read_bytes())

    qid = 0
    for split, img_ids in _SLAKE_SPLIT_IMAGES.items():
        questions = []  # (img_id, (lang, question, answer, answer_type, content_type))
        for img_id in img_ids:
            questions += [(img_id, q) for q in _slake_questions(img_id)]
            if img_id in _SLAKE_ZH_IMAGES:
                questions += [(img_id, q) for q in _slake_zh(img_id)]
        if split == "train":
            # Chinese train questions about an English *test* image: the release's leak.
            questions += [(5, q) for q in _slake_zh(5)]
            questions.append((2, ("zh", "这张图片中有几个肺?", "2", "OPEN", "Quantity")))
        if split == "test":
            # The release has a row with an empty answer: kept by the reader, not a bad row.
            questions.append(
                (6, ("en", "What is the largest organ in the picture?", "", "OPEN", "Organ"))
            )
        rows = []
        for img_id, (lang, question, answer, answer_type, content) in questions:
            modality, location, _, _ = _SLAKE_IMAGES[_SLAKE_COPY.get(img_id, img_id)]
            rows.append(
                {
                    "img_id": img_id,
                    "img_name": f"xmlab{img_id}/source.jpg",
                    "question": question,
                    "answer": answer,
                    "q_lang": lang,
                    "location": location,
                    "modality": modality,
                    "answer_type": answer_type,
                    "base_type": "vqa",
                    "content_type": content,
                    "triple": ["vhead", "_", "_"],
                    "qid": qid,
                }
            )
            qid += 1
        (base / f"{split}.json").write_text(json.dumps(rows, ensure_ascii=False, indent=4), "utf-8")
    return base


# ---------------------------------------------------------------------------------------- VQA-RAD

# image name -> (organ, modality, lesion side, nodule count)
_RAD_IMAGES = {
    "synpic100132.jpg": ("CHEST", "X-Ray", "left", 2),
    "synpic100176.jpg": ("HEAD", "MRI", None, 0),
    "synpic12210.jpg": ("ABD", "CT", "right", 3),
    "synpic17738.jpg": ("CHEST", "X-Ray", None, 1),
    "synpic51774.jpg": ("HEAD", "CT", "right", 0),
}
_RAD_TRAIN = ["synpic100132.jpg", "synpic100176.jpg", "synpic12210.jpg", "synpic17738.jpg"]
_RAD_TEST = [
    "synpic51774.jpg",
    "synpic12210.jpg",
]  # synpic12210 is in train too (the release does this)

#: Questions per split returned by :func:`medtune.data.vqa_rad`.
VQA_RAD_FIXTURE_COUNTS = {"train": 32, "test": 8}


def _rad_questions(name: str) -> list[tuple[str, str, object, str, str]]:
    """(question, paraphrase, answer, answer_type as written, question_type)."""
    organ, modality, lesion, nodules = _RAD_IMAGES[name]
    return [
        ("Is there a mass?", "Is a mass present?", "Yes" if lesion else "No", "CLOSED ", "PRES"),
        ("How many nodules are seen?", "What is the number of nodules?", nodules, "OPEN", "COUNT"),
        (
            "Which side is the lesion on?",
            "On which side is the lesion?",
            lesion if lesion else "none",
            "OPEN",
            "POS",
        ),
        (
            "What imaging modality was used?",
            "What kind of scan is this?",
            modality,
            "CLOSED",
            "MODALITY",
        ),
    ]


def make_vqa_rad_fixture(root: str | Path) -> Path:
    """Write a miniature OSF VQA-RAD under ``root`` and return the ``root/VQA_RAD`` folder.

    Args:
        root: parent folder (created if needed).

    Returns:
        The folder holding ``VQA_RAD Dataset Public.json`` and ``VQA_RAD Image Folder/``.
    """
    base = Path(root) / "VQA_RAD"
    folder = base / "VQA_RAD Image Folder"
    folder.mkdir(parents=True, exist_ok=True)
    for k, (name, (_, modality, lesion, nodules)) in enumerate(sorted(_RAD_IMAGES.items())):
        make_medical_image(300 + k, modality=modality, lesion=lesion, nodules=nodules).save(
            folder / name, quality=95
        )
    rows = []
    qid = 0
    for split, names in (("train", _RAD_TRAIN), ("test", _RAD_TEST)):
        prefix = "" if split == "train" else "test_"
        for name in names:
            organ = _RAD_IMAGES[name][0]
            questions = _rad_questions(name)
            if split == "test":
                questions = questions[:2]
            for q, para, answer, answer_type, qtype in questions:
                linked = f"0{qid:07d}-rad-fixture"
                case = f"https://medpix.nlm.nih.gov/case?id={name[6:-4]}"
                common = {
                    "qid_linked_id": linked,
                    "image_case_url": case,
                    "image_name": name,
                    "image_organ": organ,
                    "evaluation": "not evaluated",
                    "question_relation": "NULL",
                    "question_frame": "NULL",
                    "question_type": qtype,
                    "answer": answer,
                    "answer_type": answer_type,
                }
                rows.append(
                    {
                        "qid": qid,
                        "phrase_type": prefix + "freeform",
                        "question": q,
                        "question_rephrase": para,
                        **common,
                    }
                )
                rows.append(
                    {
                        "qid": qid + 1,
                        "phrase_type": prefix + "para",
                        "question": para,
                        "question_rephrase": "NULL",
                        **common,
                    }
                )
                qid += 2
    (base / "VQA_RAD Dataset Public.json").write_text(json.dumps(rows, indent=4), "utf-8")
    return base
