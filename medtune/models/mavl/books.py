"""MAVL's knowledge books: the entity and anatomy lists, the concept/disease JSON files, and their
CLS embeddings from a frozen BERT-style text encoder.

Followed: ``Pretrain/models/model_MAVL.py`` (``MAVL.__init__``: CLS of ``last_hidden_state``; the
concept book is the disease description followed by the K aspect sentences of each entity) and
``Pretrain/dataset/dataset.py`` (``VL_Dataset.anatomy_list`` / ``obs_list``) of
HieuPhan33/CVPR2024_MAVL. MAVL orders its books by the JSON files' key order; here each book is
indexed by entity name (as its ``Zero-shot_classification/test.py`` does), so a JSON file with
extra or reordered keys cannot shift the rows.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from medtune.utils.errors import UserError

# MedKLIP / MAVL's 75 observation entities, in the order of the label matrix columns.
ENTITIES: tuple[str, ...] = (
    "normal", "clear", "sharp", "sharply", "unremarkable", "intact", "stable", "free",
    "effusion", "opacity", "pneumothorax", "edema", "atelectasis", "tube", "consolidation", "process",
    "abnormality", "enlarge", "tip", "low", "pneumonia", "line", "congestion", "catheter",
    "cardiomegaly", "fracture", "air", "tortuous", "lead", "disease", "calcification", "prominence",
    "device", "engorgement", "picc", "clip", "elevation", "expand", "nodule", "wire", "fluid",
    "degenerative", "pacemaker", "thicken", "marking", "scar", "hyperinflate", "blunt", "loss",
    "widen", "collapse", "density", "emphysema", "aerate", "mass", "crowd", "infiltrate", "obscure",
    "deformity", "hernia", "drainage", "distention", "shift", "stent", "pressure", "lesion",
    "finding", "borderline", "hardware", "dilation", "chf", "redistribution", "aspiration",
    "tail_abnorm_obs", "excluded_obs",
)  # fmt: skip

# MedKLIP's 51 anatomical landmarks, in the order of the label matrix rows.
ANATOMY: tuple[str, ...] = (
    "trachea", "left_hilar", "right_hilar", "hilar_unspec", "left_pleural", "right_pleural",
    "pleural_unspec", "heart_size", "heart_border", "left_diaphragm", "right_diaphragm",
    "diaphragm_unspec", "retrocardiac", "lower_left_lobe", "upper_left_lobe", "lower_right_lobe",
    "middle_right_lobe", "upper_right_lobe", "left_lower_lung", "left_mid_lung", "left_upper_lung",
    "left_apical_lung", "left_lung_unspec", "right_lower_lung", "right_mid_lung", "right_upper_lung",
    "right_apical_lung", "right_lung_unspec", "lung_apices", "lung_bases", "left_costophrenic",
    "right_costophrenic", "costophrenic_unspec", "cardiophrenic_sulcus", "mediastinal", "spine",
    "clavicle", "rib", "stomach", "right_atrium", "right_ventricle", "aorta", "svc", "interstitium",
    "parenchymal", "cavoatrial_junction", "cardiopulmonary", "pulmonary", "lung_volumes",
    "unspecified", "other",
)  # fmt: skip

# MAVL's ``keep_disease`` (``exclude_class: True`` trains on these only).
KEEP_ENTITIES: tuple[str, ...] = (
    "effusion", "pneumothorax", "edema", "atelectasis", "consolidation", "abnormality", "pneumonia",
    "cardiomegaly", "nodule", "thicken", "emphysema", "mass", "infiltrate", "hernia",
    "tail_abnorm_obs",
)  # fmt: skip


def anatomy_sentences() -> list[str]:
    """The anatomy book: "It is located at <landmark>" for the 51 landmarks + "It is not present"
    (52 rows; ``Pretrain/models/model_MAVL.py``'s ``__main__`` / ``train_MAVL.py``)."""
    return [f"It is located at {a}" for a in ANATOMY] + ["It is not present"]


def _read_json(path: str | Path, what: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: {what} file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object {{entity: ...}} ({what})")
    return data


def read_disease_book(path: str | Path, entities: list[str] | tuple[str, ...]) -> list[str]:
    """``observation explanation.json`` (``{entity: description}``) -> descriptions in ``entities``
    order. Raises UserError naming the file and the first entities it lacks."""
    data = _read_json(path, "disease book")
    missing = [e for e in entities if not isinstance(data.get(e), str) or not data[e].strip()]
    if missing:
        raise UserError(
            f"{path}: no description for entities {missing[:5]} (expected a string each)"
        )
    return [data[e] for e in entities]


def read_concept_book(
    path: str | Path, entities: list[str] | tuple[str, ...], n_aspects: int | None = None
) -> list[list[str]]:
    """MAVL's concept JSON (``concept_gen/gpt4_mimic.json``: ``{entity: [aspect sentences]}``, 8
    each) -> the aspect lists in ``entities`` order, all of one length ``n_aspects`` (default: the
    first entity's)."""
    data = _read_json(path, "concept book")
    out = []
    for e in entities:
        aspects = data.get(e)
        if not isinstance(aspects, list) or not all(isinstance(a, str) for a in aspects):
            raise UserError(f"{path}: entity {e!r}: expected a list of aspect sentences")
        n_aspects = len(aspects) if n_aspects is None else n_aspects
        if len(aspects) != n_aspects:
            raise UserError(
                f"{path}: entity {e!r} has {len(aspects)} aspects, expected {n_aspects} "
                "(every entity needs the same number)"
            )
        out.append(list(aspects))
    return out


@torch.no_grad()
def encode_sentences(
    text_model_dir: str | Path, sentences: list[str], *, max_length: int = 128, batch_size: int = 64
) -> torch.Tensor:
    """CLS embeddings of ``sentences`` by a frozen HF BERT-style encoder in a local folder.

    Args:
        text_model_dir: HF folder (config, weights, tokenizer), e.g. Bio_ClinicalBERT. Nothing downloads.
        sentences: n strings.
        max_length: truncation length (MAVL: 128 in pretraining, 64 in its zero-shot test; with the
            attention mask the CLS does not depend on padding).

    Returns:
        float32 [n, hidden] (``last_hidden_state[:, 0]``).
    """
    from transformers import AutoModel, AutoTokenizer

    folder = Path(text_model_dir)
    if not (folder / "config.json").is_file():
        raise UserError(f"text_model_dir: {folder} is not a HF model folder (no config.json)")
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    bert = AutoModel.from_pretrained(str(folder), local_files_only=True).eval()
    out = []
    for i in range(0, len(sentences), batch_size):
        enc = tok(sentences[i : i + batch_size], padding=True, truncation=True,
                  max_length=max_length, return_tensors="pt")  # fmt: skip
        out.append(bert(**enc).last_hidden_state[:, 0].float())
    return torch.cat(out)


def encode_books(
    text_model_dir: str | Path,
    disease_book: str | Path,
    concept_book: str | Path,
    entities: list[str] | tuple[str, ...] = ENTITIES,
    *,
    max_length: int = 128,
) -> dict[str, torch.Tensor]:
    """Encode MAVL's three books.

    Returns:
        ``{"anatomy": [52, T], "concepts": [E * K, T]}`` where row ``e * K + k`` is entity ``e``'s
        concept ``k``: ``k = 0`` the disease description, ``k >= 1`` its aspects (K = aspects + 1).
    """
    diseases = read_disease_book(disease_book, entities)
    aspects = read_concept_book(concept_book, entities)
    rows = [s for d, a in zip(diseases, aspects) for s in [d, *a]]
    return {
        "anatomy": encode_sentences(text_model_dir, anatomy_sentences(), max_length=max_length),
        "concepts": encode_sentences(text_model_dir, rows, max_length=max_length),
    }
