"""MiniGPT-4 / XrayGPT checkpoints -> a Q-Former MedVLM with a Vicuna LLM, on state dicts with
MiniGPT-4's names (``xraygpt/models/mini_gpt4.py``) at tiny size, and the full-size shapes on meta."""

from __future__ import annotations

import pytest
import torch

from medtune.models.blip2.connector import Blip2QFormerConnector
from medtune.models.convert import KeyMapError
from medtune.models.convert.init import foreign_state_dict
from medtune.models.convert.minigpt4 import minigpt4_state_dict
from medtune.models.encoders import timm_vision
from medtune.models.llm import decoder_from_hf_config
from medtune.models.llm.builders import family_medvlm
from medtune.testing.llm_families import cached_tiny_llms
from tests.models.convert.lavis_names import eva_vit, lavis_qformer, lavis_stage1_heads

Q = dict(layers=2, hidden=32, inter=64, vocab=50, max_pos=20, queries=4)


@pytest.fixture(scope="module")
def model():
    dec, fam = decoder_from_hf_config(cached_tiny_llms() / "vicuna_tiny" / "config.json")
    enc = timm_vision("eva_giant_patch14_224", image_size=28, depth=2, embed_dim=32, num_heads=2)
    kw = dict(num_query_tokens=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
              intermediate_size=64)  # fmt: skip
    return family_medvlm(dec, fam, enc, connector="blip2_qformer", connector_kwargs=kw)


def _proj(llm_dim=64):
    return {"llama_proj.weight": torch.randn(llm_dim, 32), "llama_proj.bias": torch.randn(llm_dim)}


def test_full_checkpoint_with_vision(model, tmp_path):
    sd = (
        lavis_qformer(vision_width=32, text=False, **Q)
        | _proj()
        | eva_vit(depth=2, dim=32, patch=14, image=28)
    )
    torch.save({"model": sd}, tmp_path / "xraygpt.pth")
    mapped = foreign_state_dict(model, {"kind": "minigpt4", "path": str(tmp_path / "xraygpt.pth")})
    assert any(k.startswith("encoders.image.tower.blocks.1.") for k in mapped)
    model.load_state_dict(mapped, strict=False)
    conn = model.connectors["image"]
    assert torch.equal(conn.proj.weight, sd["llama_proj.weight"])
    assert torch.equal(conn.query_tokens, sd["query_tokens"])
    assert torch.equal(
        conn.qformer.encoder.layer[1].output_query.dense.weight,
        sd["Qformer.bert.encoder.layer.1.output_query.dense.weight"],
    )
    tower = model.encoders["image"].tower
    assert torch.equal(tower.blocks[0].attn.q_bias, sd["visual_encoder.blocks.0.attn.q_bias"])
    # the loaded model runs: image -> 4 query tokens in the LLM's width
    out = model.encode_images(torch.randn(1, 3, 28, 28))
    assert out.shape == (1, 4, 64)


def test_projection_only_over_lavis_qformer(model):
    """A released checkpoint saves llama_proj alone; MiniGPT-4 reads the Q-Former from LAVIS's
    BLIP-2 file first (its text parts and heads are dropped)."""
    lavis = lavis_qformer(vision_width=32, **Q) | lavis_stage1_heads(32, 8)
    proj = _proj()
    mapped = minigpt4_state_dict(model, proj, qformer_state=lavis)
    assert torch.equal(mapped["connectors.image.proj.weight"], proj["llama_proj.weight"])
    assert torch.equal(mapped["connectors.image.ln_vision.weight"], lavis["ln_vision.weight"])
    assert not any(k.startswith("encoders.") for k in mapped)
    with pytest.raises(KeyMapError, match="qformer_path"):
        minigpt4_state_dict(model, proj)


def test_refuses_llm_and_shapes(model):
    sd = lavis_qformer(vision_width=32, text=False, **Q) | _proj()
    with pytest.raises(KeyMapError, match="llama_model"):
        minigpt4_state_dict(model, sd | {"llama_model.model.norm.weight": torch.ones(64)})
    with pytest.raises(KeyMapError, match="proj.weight has shape"):
        minigpt4_state_dict(model, sd | _proj(llm_dim=96))  # a projection into another LLM


def test_full_size_connector_on_meta():
    """XrayGPT's sizes: bert-base Q-Former over EVA ViT-g (1,408) into Vicuna-7B (4,096)."""
    with torch.device("meta"):
        conn = Blip2QFormerConnector(1408, 4096, num_query_tokens=32)

    class _M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.connectors = torch.nn.ModuleDict({"image": conn})

    sd = lavis_qformer(
        layers=12, hidden=768, inter=3072, vision_width=1408, vocab=30523, max_pos=512, queries=32,
        text=False, device="meta",
    )  # fmt: skip
    sd |= {"llama_proj.weight": torch.empty(4096, 768, device="meta"),
           "llama_proj.bias": torch.empty(4096, device="meta")}  # fmt: skip
    mapped = minigpt4_state_dict(_M(), sd)
    assert len(mapped) == len(conn.state_dict())
    assert mapped[
        "connectors.image.qformer.encoder.layer.0.crossattention.attention.key.weight"
    ].shape == (768, 1408)
