"""The ``pubmed_brain`` configs of ``blip_pretrain`` and ``blip_retrieval`` hold salesforce/BLIP's
values: every value of BLIP's ``configs/pretrain.yaml`` and ``configs/retrieval_coco.yaml`` (and
the few that BLIP's code fixes) is the same here, or differs with its reason in a comment on the
line, and only the listed values differ; BLIP's settings that medtune has no key for are named in a
comment of the YAML. The encoders build on ``meta`` at the configured image size."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

CONFIGS = Path(__file__).resolve().parents[2] / "recipes" / "configs"

# salesforce/BLIP configs/pretrain.yaml (commit 056a169), every value but the data paths
BLIP_PRETRAIN_YAML = {
    "vit": "base", "vit_grad_ckpt": False, "vit_ckpt_layer": 0, "image_size": 224,
    "batch_size": 75, "queue_size": 57600, "alpha": 0.4, "weight_decay": 0.05, "init_lr": 3e-4,
    "min_lr": 1e-6, "warmup_lr": 1e-6, "lr_decay_rate": 0.9, "max_epoch": 20,
    "warmup_steps": 3000,
}  # fmt: skip
# salesforce/BLIP configs/retrieval_coco.yaml (commit 056a169), every value but the data paths
BLIP_RETRIEVAL_YAML = {
    "pretrained": "https://storage.googleapis.com/sfr-vision-language-research/BLIP/models/"
    "model_base_retrieval_coco.pth",
    "vit": "base", "batch_size_train": 32, "batch_size_test": 64, "vit_grad_ckpt": True,
    "vit_ckpt_layer": 4, "init_lr": 1e-5, "image_size": 384, "queue_size": 57600, "alpha": 0.4,
    "k_test": 256, "negative_all_rank": True, "weight_decay": 0.05, "min_lr": 0, "max_epoch": 6,
}  # fmt: skip
# salesforce/BLIP code: models/blip_pretrain.py (embed_dim 256, momentum 0.995, max_length=30),
# pretrain.py (alpha ramped over 2 epochs), data/pretrain_dataset.py (max_words 30)
BLIP_PRETRAIN_CODE = {
    "embed_dim": 256, "momentum": 0.995, "max_length": 30, "alpha_epochs": 2, "max_words": 30,
}  # fmt: skip
# models/blip_retrieval.py (embed_dim 256, momentum 0.995, max_length=35), train_retrieval.py
# (alpha ramped over the first epoch), data/coco_karpathy_dataset.py (max_words 30)
BLIP_RETRIEVAL_CODE = {
    "embed_dim": 256, "momentum": 0.995, "max_length": 35, "alpha_epochs": 1, "max_words": 30,
}  # fmt: skip

# BLIP's name -> the dotted key of the medtune config that holds it
KEYS = {
    "vit": "encoder.model_name", "image_size": "encoder.image_size", "batch_size": "batch_size",
    "batch_size_train": "batch_size", "batch_size_test": "eval_batch_size",
    "queue_size": "model.queue_size", "alpha": "alpha", "weight_decay": "optimizer.weight_decay",
    "init_lr": "optimizer.lr", "min_lr": "lr_scheduler.min_lr",
    "warmup_lr": "lr_scheduler.warmup_lr", "lr_decay_rate": "lr_scheduler.lr_decay_rate",
    "max_epoch": "epochs", "warmup_steps": "lr_scheduler.warmup_steps", "k_test": "k_test",
    "pretrained": "init_from", "embed_dim": "model.embed_dim", "momentum": "model.momentum",
    "max_length": "max_length", "alpha_epochs": "alpha_warmup_epochs", "max_words": "max_words",
}  # fmt: skip
# BLIP's ViT sizes (models/vit.py via blip.py create_vit): base = ViT-B/16, timm's name
VIT = {"base": "vit_base_patch16_224"}
# what medtune has no key for: the YAML must name it in a comment (with its reason)
NO_KEY = {"vit_grad_ckpt", "vit_ckpt_layer", "negative_all_rank"}
# the only values that differ on purpose (the reason is on the config line)
DIFFERS = {"blip_pretrain": set(), "blip_retrieval": {"pretrained"}}

CASES = {
    "blip_pretrain": {**BLIP_PRETRAIN_YAML, **BLIP_PRETRAIN_CODE},
    "blip_retrieval": {**BLIP_RETRIEVAL_YAML, **BLIP_RETRIEVAL_CODE},
}


def _ours(cfg, key: str, blip_value):
    value = OmegaConf.select(cfg, key)
    if key == "encoder.model_name":
        return {v: k for k, v in VIT.items()}.get(value, value)
    if key == "init_from":
        return Path(str(value)).name, Path(str(blip_value)).name
    return value


@pytest.mark.parametrize("recipe", sorted(CASES))
def test_pubmed_brain_holds_blips_values_or_says_why(recipe):
    path = CONFIGS / recipe / "pubmed_brain.yaml"
    text = path.read_text()
    cfg = OmegaConf.load(path)
    comments = "\n".join(line.split("#", 1)[1] for line in text.splitlines() if "#" in line)
    differs = set()
    for name, blip in CASES[recipe].items():
        if name in NO_KEY:
            assert re.search(rf"\b{name}\b", comments), f"{path.name}: no comment names {name}"
            continue
        if name not in KEYS:
            continue  # pretrain.yaml's vit_grad_ckpt False etc. are NO_KEY
        ours = _ours(cfg, KEYS[name], blip)
        same = ours[0] == ours[1] if isinstance(ours, tuple) else ours == pytest.approx(blip)
        if not same:
            differs.add(name)
            leaf = KEYS[name].split(".")[-1]
            (line,) = [x for x in text.splitlines() if re.match(rf"\s*{leaf}:", x)]
            assert "#" in line and "BLIP" in line.split("#", 1)[1], (
                f"{path.name}: {KEYS[name]} differs from BLIP's {name} {blip!r} without a reason"
            )
    assert differs == DIFFERS[recipe]


@pytest.mark.parametrize("recipe", sorted(CASES))
def test_pubmed_brain_encoder_builds_on_meta_at_blips_size(recipe):
    cfg = OmegaConf.load(CONFIGS / recipe / "pubmed_brain.yaml")
    from medtune.models.blip.model import vit_trunk
    from medtune.models.encoders import timm_vision

    kw = OmegaConf.to_container(cfg.encoder)
    kw.pop("_component_")
    kw["checkpoint_path"] = None
    with torch.device("meta"):
        enc = timm_vision(**kw)
    size = CASES[recipe]["image_size"]
    vit = vit_trunk(enc)  # the timm ViT the BLIP model takes as visual_encoder
    n_tokens = 1 + (size // 16) ** 2
    assert tuple(vit.pos_embed.shape) == (1, n_tokens, 768)
    assert len(vit.blocks) == 12 and vit.blocks[0].attn.num_heads == 12
