"""medcap's released ``last.pt`` ({'visual': open_clip visual state dict, 'projector':
Sequential(Linear, GELU, Linear)}) -> a MedVLM's encoder + ``pooled_unfold`` connector."""

from __future__ import annotations

import pytest
import torch

from medtune.models.builders import medvlm, medvlm_medcap_llama3_8b
from medtune.models.convert import KeyMapError
from medtune.models.convert.init import foreign_state_dict
from medtune.models.encoders import open_clip_vision
from medtune.models.llama3 import build_decoders_on, llama3_tiny
from medtune.testing.medcap import write_medcap_checkpoint


def _medcap_file(clip_dir, tmp_path, n_tokens=3, hidden=16, llm=64):
    path = tmp_path / "last.pt"
    visual, projector = write_medcap_checkpoint(clip_dir, path, llm, n_tokens, hidden)
    return path, visual, projector


def _tiny_medcap(clip_dir, n_tokens=3):
    enc = open_clip_vision(str(clip_dir), output="pooled")
    kw = {"num_tokens": n_tokens, "hidden_dim": 16}
    return medvlm(llama3_tiny(vocab_size=300), enc, connector="pooled_unfold", connector_kwargs=kw,
                  image_token_id=46)  # fmt: skip


def test_tiny_medcap_loads(tiny_assets, tmp_path):
    clip = tiny_assets / "tiny_clip"
    model = _tiny_medcap(clip)
    path, visual, proj = _medcap_file(clip, tmp_path)
    for k in model.encoders["image"].tower.state_dict():  # fresh random weights first
        model.encoders["image"].tower.state_dict()[k].zero_()
    mapped = foreign_state_dict(model, {"kind": "medcap", "path": str(path)})
    model.load_state_dict(mapped, strict=False)
    assert torch.equal(model.encoders["image"].tower.conv1.weight, visual["conv1.weight"])
    assert torch.equal(model.connectors["image"].proj[2].weight, proj["2.weight"])
    assert model.encode_images(torch.randn(2, 3, 32, 32)).shape == (2, 3, 64)


def test_refuses_other_token_count_and_layout(tiny_assets, tmp_path):
    clip = tiny_assets / "tiny_clip"
    path, _, _ = _medcap_file(clip, tmp_path, n_tokens=5)
    with pytest.raises(KeyMapError, match=r"proj\.2\.weight has shape"):
        foreign_state_dict(_tiny_medcap(clip), {"kind": "medcap", "path": str(path)})
    torch.save({"visual": {}}, tmp_path / "bad.pt")
    with pytest.raises(KeyMapError, match="'visual' and 'projector'"):
        foreign_state_dict(_tiny_medcap(clip), {"kind": "medcap", "path": str(tmp_path / "bad.pt")})


@pytest.mark.slow  # builds BiomedCLIP's ViT-B on meta (about 10 s)
def test_full_size_on_meta():
    from medtune.models.convert.medcap import medcap_state_dict

    with build_decoders_on("meta"), torch.device("meta"):
        model = medvlm_medcap_llama3_8b()
    visual = {k: torch.empty(v.shape, device="meta")
              for k, v in model.encoders["image"].tower.state_dict().items()}  # fmt: skip
    projector = {  # medcap: Linear(512, 4096), GELU, Linear(4096, 4096 * 50)
        "0.weight": torch.empty(4096, 512, device="meta"),
        "0.bias": torch.empty(4096, device="meta"),
        "2.weight": torch.empty(4096 * 50, 4096, device="meta"),
        "2.bias": torch.empty(4096 * 50, device="meta"),
    }
    mapped = medcap_state_dict(model, {"visual": visual, "projector": projector})
    assert mapped["connectors.image.proj.2.weight"].shape == (204800, 4096)
    assert model.tokens_per_image == 50
