"""Tiny dual-encoder assets: an open_clip model WITH a text tower, in BiomedCLIP's layout.

``make_tiny_towers(out)`` writes (nothing is downloaded)::

    out/tiny_bert/            a tiny HF BERT folder, like a PubMedBERT download:
        config.json  model.safetensors  vocab.txt  tokenizer.json  tokenizer_config.json
    out/tiny_biomedclip/      open_clip hub layout, like microsoft/BiomedCLIP-PubMedBERT_256-...:
        open_clip_config.json (text_cfg.hf_model_name = the PubMedBERT hub id, as published)
        open_clip_pytorch_model.bin  vocab.txt  tokenizer.json  tokenizer_config.json
    out/tiny_captions/        caption JSON in the brain-VLP layout: {train,val,test}.json = [{image, caption}]
        images/<n>.png        synthetic scans (medtune.testing.synthetic.render_scan)
    out/tiny_cxr14/           ChestX-ray14 layout: Data_Entry_2017.csv, train_val_list.txt, test_list.txt,
        images/<name>.png     labels "Nodule" (a lesion is drawn) / "Mass" (lesion in the upper half)
    out/concepts.json         a MAVL-style concept book {disease: [aspect sentences]}

As with the real BiomedCLIP, the hub folder names its text tower by HF id; medtune builds it from a
local folder given as ``text_model_dir`` (here ``tiny_bert``), so nothing needs the network.

Run ``python -m medtune.testing.towers --out assets/tiny_towers`` for the demo configs.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch

PUBMEDBERT_ID = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"
TINY_BERT = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    # no dropout: a deterministic forward, so N ranks can equal 1 process exactly in tests
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)
TINY_TOWER_VISION = dict(image_size=32, patch_size=8, width=64, layers=2, head_width=16)
EMBED_DIM = 24
CONTEXT_LENGTH = 24

_WORDS = [
    "a",
    "an",
    "the",
    "of",
    "in",
    "on",
    "with",
    "and",
    "no",
    "is",
    "are",
    "there",
    "this",
    "scan",
    "image",
    "photo",
    "chest",
    "x",
    "ray",
    "ct",
    "mri",
    "normal",
    "lesion",
    "upper",
    "lower",
    "left",
    "right",
    "region",
    "finding",
    "findings",
    "nodule",
    "mass",
    "abnormal",
    "pneumonia",
    "pneumothorax",
    "effusion",
    "opacity",
    "lung",
    "lungs",
    "bright",
    "round",
    "spot",
    "dark",
    "clear",
    "healthy",
    "shows",
    "showing",
    "evidence",
    "small",
    "large",
    "part",
    "side",
]
_TOKENIZER_FILES = (
    "vocab.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


def write_tiny_bert(out: Path, seed: int = 0) -> Path:
    """A tiny random BERT in HF layout with a word-level ``vocab.txt``. Returns the folder."""
    from transformers import BertConfig, BertModel, BertTokenizer

    out.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *".,-:;()", *_WORDS]
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(str(out / "vocab.txt"), do_lower_case=True).save_pretrained(str(out))
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(vocab), max_position_embeddings=64, pad_token_id=0, **TINY_BERT)
    BertModel(cfg, add_pooling_layer=False).save_pretrained(str(out), safe_serialization=True)
    return out


def biomedclip_like_config(embed_dim: int = EMBED_DIM) -> dict:
    """``open_clip_config.json`` of the tiny BiomedCLIP: its text_cfg keys, a tiny ViT."""
    return {
        "model_cfg": {
            "embed_dim": embed_dim,
            "vision_cfg": dict(TINY_TOWER_VISION),
            "text_cfg": {
                "hf_model_name": PUBMEDBERT_ID,
                "hf_tokenizer_name": PUBMEDBERT_ID,
                "hf_proj_type": "mlp",
                "hf_pooler_type": "cls_last_hidden_state_pooler",
                "context_length": CONTEXT_LENGTH,
            },
        },
        "preprocess_cfg": {
            "mean": [0.48145466, 0.4578275, 0.40821073],
            "std": [0.26862954, 0.26130258, 0.27577711],
        },
    }


def write_tiny_biomedclip(out: Path, bert_dir: Path, seed: int = 0) -> Path:
    """The tiny BiomedCLIP hub folder; its text tower starts from ``bert_dir``'s weights."""
    from safetensors.torch import load_file

    from medtune.models.dual_encoder import build_open_clip_model

    out.mkdir(parents=True, exist_ok=True)
    config = biomedclip_like_config()
    torch.manual_seed(seed)
    model = build_open_clip_model(config, text_model_dir=str(bert_dir))
    bert = load_file(str(bert_dir / "model.safetensors"))
    model.text.transformer.load_state_dict(bert, strict=True)
    (out / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    torch.save(model.state_dict(), out / "open_clip_pytorch_model.bin")
    for name in _TOKENIZER_FILES:  # the files transformers wrote (they differ between versions)
        if (bert_dir / name).is_file():
            shutil.copy(bert_dir / name, out / name)
    return out


def _scan(rng: np.random.Generator, pyrng: random.Random):
    from medtune.testing.synthetic import MODALITIES

    modality = pyrng.choice(list(MODALITIES))
    lesion = (
        None
        if pyrng.random() < 0.3
        else (pyrng.choice(["left", "right"]), pyrng.choice(["upper", "lower"]))
    )
    return modality, lesion


def write_tiny_captions(out: Path, n: dict[str, int] | None = None, seed: int = 0) -> Path:
    """``{split}.json`` = ``[{image, caption}]`` over synthetic scans (caption: what is drawn)."""
    from PIL import Image

    from medtune.testing.synthetic import describe, render_scan

    n = n or {"train": 96, "val": 24, "test": 24}
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng, pyrng = np.random.default_rng(seed), random.Random(seed)
    k = 0
    for split, count in n.items():
        rows = []
        for _ in range(count):
            modality, lesion = _scan(rng, pyrng)
            name = f"images/{k:04d}.png"
            Image.fromarray(render_scan(modality, lesion, rng, 64)).save(out / name)
            rows.append({"image": name, "caption": describe(modality, lesion)})
            k += 1
        (out / f"{split}.json").write_text(json.dumps(rows, indent=1))
    return out


CXR14_COLUMNS = (
    "Image Index",
    "Finding Labels",
    "Follow-up #",
    "Patient ID",
    "Patient Age",
    "Patient Gender",
    "View Position",
    "OriginalImage[Width",
    "Height]",
    "OriginalImagePixelSpacing[x",
    "y]",
)


def write_tiny_cxr14(out: Path, n_train: int = 40, n_test: int = 24, seed: int = 1) -> Path:
    """ChestX-ray14's download layout over synthetic scans (``Nodule`` = a lesion is drawn,
    ``Mass`` = it is in the upper half; ``No Finding`` otherwise)."""
    from PIL import Image

    from medtune.testing.synthetic import render_scan

    (out / "images").mkdir(parents=True, exist_ok=True)
    rng, pyrng = np.random.default_rng(seed), random.Random(seed)
    rows, names = [], {"train": [], "test": []}
    for i in range(n_train + n_test):
        _, lesion = _scan(rng, pyrng)
        name = f"{i:08d}_000.png"
        Image.fromarray(render_scan("X-Ray", lesion, rng, 64)).save(out / "images" / name)
        labels = []
        if lesion:
            labels.append("Nodule")
            if lesion[1] == "upper":
                labels.append("Mass")
        finding = "|".join(labels) or "No Finding"
        rows.append([name, finding, 0, i, 50, "M", "PA", 64, 64, 0.1, 0.1])
        names["train" if i < n_train else "test"].append(name)
    with open(out / "Data_Entry_2017.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CXR14_COLUMNS)
        w.writerows(rows)
    (out / "train_val_list.txt").write_text("\n".join(names["train"]) + "\n")
    (out / "test_list.txt").write_text("\n".join(names["test"]) + "\n")
    return out


CONCEPTS = {
    "Nodule": ["a bright round lesion in the lung", "a small round spot"],
    "Mass": ["a lesion in the upper region", "a large lesion in the upper part"],
}


def make_tiny_towers(out: str | Path, seed: int = 0) -> Path:
    """Write all tower assets under ``out`` (a folder marked complete is reused). Returns ``out``."""
    out = Path(out)
    if (out / ".complete").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    bert = write_tiny_bert(out / "tiny_bert", seed=seed)
    write_tiny_biomedclip(out / "tiny_biomedclip", bert, seed=seed)
    write_tiny_captions(out / "tiny_captions", seed=seed)
    write_tiny_cxr14(out / "tiny_cxr14", seed=seed + 1)
    (out / "concepts.json").write_text(json.dumps(CONCEPTS, indent=1))
    (out / ".complete").write_text("ok\n")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description="write the tiny dual-encoder assets")
    p.add_argument("--out", default="assets/tiny_towers")
    args = p.parse_args()
    print(f"tiny towers ready in {make_tiny_towers(args.out)}")


if __name__ == "__main__":
    main()
