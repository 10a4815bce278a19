"""medtune.models.dual_encoder on the tiny BiomedCLIP-layout folder (HF BERT text tower, offline)."""

from __future__ import annotations

import pytest
import torch

from medtune.models.dual_encoder import (
    TowerConfigError,
    dual_encoder_from_towers,
    open_clip_dual_encoder,
    tokenizer_for,
)
from medtune.testing.towers import biomedclip_like_config


def test_both_towers_build_offline_and_return_unit_features(tiny_towers):
    m = open_clip_dual_encoder(
        str(tiny_towers / "tiny_biomedclip"), str(tiny_towers / "tiny_bert"), itm=True
    )
    tok = tokenizer_for(m)(["ct scan, lesion in the upper left region.", "normal"])
    assert tok.shape == (2, 24) and tok[0, 0] == 2  # [CLS] first, padded to the context length
    out = m(torch.randn(2, 3, 32, 32), tok, with_tokens=True)
    torch.testing.assert_close(out["image_features"].norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(out["text_features"].norm(dim=-1), torch.ones(2))
    assert out["image_tokens"].shape == (2, 16, 64) and out["text_tokens"].shape == (2, 24, 32)
    assert out["text_mask"][1].sum() == 3  # [CLS] normal [SEP]
    assert m.itm(out["image_tokens"], out["text_tokens"], out["text_mask"]).shape == (2, 2)


def test_hf_id_without_local_folder_is_a_clear_error(tiny_towers):
    with pytest.raises(TowerConfigError, match="Hugging Face id and medtune never downloads"):
        open_clip_dual_encoder(str(tiny_towers / "tiny_biomedclip"))


def test_towers_named_by_config_load_the_text_weights(tiny_towers):
    from safetensors.torch import load_file

    cfg = biomedclip_like_config()
    m = dual_encoder_from_towers(cfg["model_cfg"], str(tiny_towers / "tiny_bert"))
    bert = load_file(str(tiny_towers / "tiny_bert" / "model.safetensors"))
    own = m.clip.text.transformer.state_dict()
    for k, v in bert.items():
        assert torch.equal(own[k], v), k
