"""The shipped full-size vision_finetune configs: valid components, known keys, and models that
build on the meta device with the real models' parameter counts."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torchtune import config

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "recipes" / "configs" / "vision_finetune"

LLAMA3_8B = 8_030_261_248  # Meta's published Llama-3-8B parameter count
# BiomedCLIP visual tower = timm vit_base_patch16_224 trunk (no classifier head) + linear 768->512:
# patch embed 3*16*16*768+768, cls 768, pos 197*768, 12 blocks of
# (2 LN 4*768 + qkv 768*2304+2304 + proj 768*768+768 + fc1 768*3072+3072 + fc2 3072*768+768),
# final LN 2*768, projection 768*512.
_BLOCK = (
    4 * 768 + (768 * 2304 + 2304) + (768 * 768 + 768) + (768 * 3072 + 3072) + (3072 * 768 + 768)
)
BIOMEDCLIP_VISUAL = (3 * 16 * 16 * 768 + 768) + 768 + 197 * 768 + 12 * _BLOCK + 2 * 768 + 768 * 512
MLP_768_4096 = 768 * 4096 + 4096 + 4096 * 4096 + 4096


def _known_keys() -> set[str]:
    return set(
        runpy.run_path(str(REPO / "recipes" / "vision_finetune.py"), run_name="recipe")[
            "KNOWN_KEYS"
        ]
    )


@pytest.mark.parametrize("name", ["slake", "vqa_rad", "roco", "slake_msmedcap", "demo"])
def test_config_keys_known_and_components_bind(name):
    from medtune._cli.validate import collect_problems

    cfg = OmegaConf.load(CONFIGS / f"{name}.yaml")
    assert set(cfg.keys()) <= _known_keys(), set(cfg.keys()) - _known_keys()
    problems = collect_problems(OmegaConf.to_container(cfg, resolve=True))
    assert problems == []


@pytest.mark.parametrize("name", ["slake", "vqa_rad", "roco"])
def test_full_size_model_on_meta_device(name):
    cfg = OmegaConf.load(CONFIGS / f"{name}.yaml")
    cfg.model.encoder_path = None  # build from BiomedCLIP's published config, no files
    with torch.device("meta"):
        model = config.instantiate(cfg.model)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(model.decoder) == LLAMA3_8B
    assert count(model.encoders) == BIOMEDCLIP_VISUAL
    assert count(model.connectors) == MLP_768_4096
    assert model.tokens_per_image == 196
    assert model.image_token_id == 128002
    assert model.image_transforms["image"]["image_size"] == 224
    # the frozen LLM is loaded through torchtune's HF checkpointer from the 4 shards of the HF download
    assert cfg.checkpointer.model_type == "LLAMA3" and len(cfg.checkpointer.checkpoint_files) == 4


def test_msmedcap_config_builds_on_meta_and_freezes_the_encoders():
    from medtune.training.params import set_trainable

    cfg = OmegaConf.load(CONFIGS / "slake_msmedcap.yaml")
    cfg.model.encoder_path = None
    cfg.model.sam_checkpoint = None
    with torch.device("meta"):
        model = config.instantiate(cfg.model)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(model.decoder) == LLAMA3_8B
    assert count(model.encoders["clip"]) == BIOMEDCLIP_VISUAL
    assert count(model.encoders["sam"]) == 89_670_912  # SAM ViT-B image encoder
    assert model.tokens_per_image == 2 * cfg.model.num_queries
    set_trainable(
        model,
        dict(cfg.trainable),
        allowed={"encoder": ("frozen",), "connector": ("full",), "llm": ("frozen",)},
    )
    trained = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {"connectors"} and set(cfg.lr) == {"connector"}
