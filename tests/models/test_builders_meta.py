"""Full-size named builders, built on the ``meta`` device: parameter counts of each part match the
real models (computed here from the architectures, not by calling the builders)."""

from __future__ import annotations

import pytest
import torch

from medtune.models import builders


def _n(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# Llama-3-8B (and 3.1-8B, same shapes): vocab 128256, dim 4096, 32 layers, 32 query heads, 8 KV
# heads (head_dim 128 -> KV width 1024), SwiGLU hidden 14336, untied output projection.
V, D, L, KV, F = 128256, 4096, 32, 1024, 14336
LLAMA3_8B_LAYER = D * D + 2 * D * KV + D * D + 3 * D * F + 2 * D  # q, k+v, o, w1/w2/w3, 2 RMSNorms
LLAMA3_8B = 2 * V * D + L * LLAMA3_8B_LAYER + D  # embedding + output + layers + final norm
assert LLAMA3_8B == 8_030_261_248  # the published figure

# BiomedCLIP visual tower: timm vit_base_patch16_224 trunk without classifier head + a bias-free
# 768 -> 512 linear projection (open_clip TimmModel, proj "linear").
W, P, T = 768, 16, 14 * 14 + 1  # width, patch size, tokens (196 patches + CLS)
VIT_BLOCK = (
    2 * W  # norm1
    + W * 3 * W
    + 3 * W  # qkv
    + W * W
    + W  # attention proj
    + 2 * W  # norm2
    + W * 4 * W
    + 4 * W  # mlp fc1
    + 4 * W * W
    + W
)  # mlp fc2
VIT_B16_TRUNK = (
    3 * P * P * W
    + W  # patch embedding conv
    + W  # CLS token
    + T * W  # position embedding
    + 12 * VIT_BLOCK
    + 2 * W
)  # final norm
BIOMEDCLIP_VISUAL = VIT_B16_TRUNK + 768 * 512
assert BIOMEDCLIP_VISUAL == 86_191_872

MLP_CONNECTOR = 768 * 4096 + 4096 + 4096 * 4096 + 4096
# medcap's projector: Linear(512, 4096), GELU, Linear(4096, 4096 * 50)
MEDCAP_PROJECTOR = (512 * 4096 + 4096) + (4096 * 4096 * 50 + 4096 * 50)


@pytest.mark.parametrize(
    "name,connector_params,tokens,enc_out",
    [
        ("medvlm_biomedclip_llama3_8b", MLP_CONNECTOR, 196, 768),
        ("medvlm_biomedclip_llama3_1_8b", MLP_CONNECTOR, 196, 768),
        ("medvlm_medcap_llama3_8b", MEDCAP_PROJECTOR, 50, 512),
    ],
)
def test_full_size_builders_on_meta(name, connector_params, tokens, enc_out):
    with torch.device("meta"):
        model = getattr(builders, name)()
    assert all(p.is_meta for p in model.parameters()), (
        "a full-size builder must not allocate real weights"
    )
    assert _n(model.decoder) == LLAMA3_8B
    (enc,) = model.encoders.values()
    assert _n(enc) == BIOMEDCLIP_VISUAL
    assert _n(enc.tower.trunk) == VIT_B16_TRUNK
    (conn,) = model.connectors.values()
    assert _n(conn) == connector_params
    assert model.tokens_per_image == tokens
    assert enc.out_dim == enc_out and conn.in_dim == enc_out and conn.out_dim == 4096
    assert model.image_token_id == 128002
    assert enc.transform["image_size"] == 224
    assert enc.transform["mean"] == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    # the decoder state dict keeps torchtune's names (so torchtune's checkpointers load into it)
    assert "tok_embeddings.weight" in model.decoder.state_dict()
    assert model.decoder.output.weight.shape == (V, D)


def test_llama3_1_builder_uses_scaled_rope():
    with torch.device("meta"):
        m3 = builders.medvlm_biomedclip_llama3_8b()
        m31 = builders.medvlm_biomedclip_llama3_1_8b()
    assert m3.decoder.max_seq_len == 8192
    assert m31.decoder.max_seq_len == 131072


# SAM ViT-B image encoder (Kirillov et al. 2023): 89,670,912 parameters, the published figure
# (SAM ViT-B 93.7M = image encoder + prompt encoder + mask decoder).
SAM_VIT_B = 89_670_912


def _learned_queries(
    in_dim: int, n_q: int = 32, h: int = 768, layers: int = 2, out: int = 4096
) -> int:
    """LearnedQueryConnector: queries; per layer self-attn, cross-attn, MLP, 3 LayerNorms over the queries and
    one over the encoder tokens; final LayerNorm + projection."""
    self_attn = 4 * h * h + 4 * h
    cross = (
        h * h + h + 2 * (in_dim * h + h) + h * h + h
    )  # q from queries, k/v from the encoder, out proj
    mlp = h * 4 * h + 4 * h + 4 * h * h + h
    return (
        n_q * h
        + layers * (self_attn + cross + mlp + 3 * 2 * h + 2 * in_dim)
        + 2 * h
        + h * out
        + out
    )


def test_msmedcap_dual_encoder_builder_on_meta():
    with torch.device("meta"):
        model = builders.medvlm_msmedcap_llama3_8b()
    assert all(p.is_meta for p in model.parameters())
    assert list(model.encoders) == ["sam", "clip"]
    assert _n(model.decoder) == LLAMA3_8B
    assert _n(model.encoders["sam"]) == SAM_VIT_B
    assert _n(model.encoders["clip"]) == BIOMEDCLIP_VISUAL
    assert model.encoders["sam"].num_tokens == 64 * 64 and model.encoders["sam"].out_dim == 256
    assert _n(model.connectors["sam"]) == _learned_queries(256)
    assert _n(model.connectors["clip"]) == _learned_queries(768)
    assert model.tokens_per_image == 64  # 32 queries per encoder
    assert model.image_transforms["sam"]["image_size"] == 1024
    assert model.image_transforms["clip"]["image_size"] == 224
