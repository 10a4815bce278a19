"""7B-shape builders against the published parameter counts (on ``meta``), family detection from
HF configs, and a MedVLM with the out-of-vocabulary placeholder: forward, save, reload."""

from __future__ import annotations

import pytest
import torch

from medtune.models.llama3 import build_decoders_on
from medtune.models.llm import decoder_from_hf_config, family_of_hf_config
from medtune.models.llm.builders import DECODERS_7B, family_medvlm, medvlm_biomedclip_qwen2_5_7b
from medtune.models.llm.placeholder import NO_RESERVED_TOKEN_ID
from medtune.models.medvlm import MedVLM
from medtune.testing.llm_families import cached_tiny_llms

# Published counts: Llama-2-7B / Vicuna-7B (meta-llama/Llama-2-7b-hf), Mistral-7B-Instruct-v0.2,
# Qwen2.5-7B-Instruct (their model cards / safetensors totals).
PUBLISHED = {
    "llama2": 6_738_415_616,
    "vicuna_v0": 6_738_415_616,
    "mistral": 7_241_732_096,
    "qwen2_5": 7_615_616_512,
}


@pytest.mark.parametrize("family", sorted(PUBLISHED))
def test_7b_counts_on_meta(family):
    with build_decoders_on("meta"):
        dec = DECODERS_7B[family]()
    assert sum(p.numel() for p in dec.parameters()) == PUBLISHED[family]


@pytest.mark.slow  # builds the BiomedCLIP ViT-B (about 10 s)
def test_full_size_medvlm_on_meta():
    with build_decoders_on("meta"), torch.device("meta"):
        vlm = medvlm_biomedclip_qwen2_5_7b()
    assert vlm.image_token_id == NO_RESERVED_TOKEN_ID
    assert vlm.decoder.tok_embeddings.weight.shape == (152064, 3584)
    assert vlm.connectors["image"](torch.empty(1, 196, 768, device="meta")).shape == (1, 196, 3584)


def test_family_of_hf_config():
    assert family_of_hf_config({"model_type": "llama", "vocab_size": 128256}) == "llama3"
    assert family_of_hf_config({"model_type": "llama", "vocab_size": 32000}) == "llama2"
    assert family_of_hf_config({"model_type": "mistral"}) == "mistral"
    assert family_of_hf_config({"model_type": "qwen2"}) == "qwen2_5"
    with pytest.raises(ValueError, match="opt"):
        family_of_hf_config({"model_type": "opt"}, "x/config.json")


class _Enc(torch.nn.Module):
    num_tokens, out_dim, transform = 3, 8, {}

    def forward(self, x):
        return x.flatten(1)[:, :24].reshape(-1, 3, 8)


@pytest.mark.parametrize("name", ["vicuna_tiny", "qwen2_5_tiny"])
def test_negative_placeholder_forward_and_reload(name, tmp_path):
    llms = cached_tiny_llms()
    torch.manual_seed(0)
    dec, family = decoder_from_hf_config(llms / name / "config.json")
    vlm = family_medvlm(dec, family, _Enc(), connector="linear")
    ph = vlm.image_token_id
    assert ph < 0
    tokens = torch.tensor([[1, ph, ph, ph, 5, 6]])
    images = torch.randn(1, 3, 4, 2)
    out = vlm(tokens, images=images)
    rows = vlm.decoder.tok_embeddings.num_embeddings
    assert out.shape == (1, 6, rows)  # the table keeps its published size
    torch.save(vlm.state_dict(), tmp_path / "m.pt")
    dec2, _ = decoder_from_hf_config(llms / name / "config.json")
    vlm2 = family_medvlm(dec2, family, _Enc(), connector="linear")
    vlm2.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True))
    torch.testing.assert_close(vlm2(tokens, images=images), out)
    with pytest.raises(ValueError, match="outside the decoder's vocabulary"):
        MedVLM(dec2, {"image": _Enc()}, {"image": vlm2.connectors["image"]}, image_token_id=rows)
