"""LAVIS blip2_pretrained.pth -> medtune's stage-1 Q-Former, on LAVIS-named state dicts."""

from __future__ import annotations

import pytest
import torch

from medtune.models.blip2.qformer import Blip2Qformer
from medtune.models.convert import KeyMapError
from medtune.models.convert.init import foreign_state_dict
from medtune.models.convert.lavis_blip2 import blip2_stage1_state_dict
from tests.models.convert.lavis_names import lavis_qformer, lavis_stage1_heads

TINY = dict(layers=2, hidden=32, inter=64, vocab=50, max_pos=20, queries=4)


def _model(vision_width=16):
    return Blip2Qformer(
        vision_width,
        num_query_tokens=4,
        embed_dim=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=50,
        max_position_embeddings=20,
    )


def _lavis(vision_width=16):
    sd = lavis_qformer(vision_width=vision_width, **TINY)
    sd |= lavis_stage1_heads(32, 8)
    sd["visual_encoder.cls_token"] = torch.zeros(1, 1, vision_width)  # dropped on purpose
    return sd


def test_tiny_map_loads_every_tensor(tmp_path):
    model, sd = _model(), _lavis()
    mapped = blip2_stage1_state_dict(model, sd)
    assert set(mapped) == set(model.state_dict())
    model.load_state_dict(mapped)
    lay = model.qformer.encoder.layer[0]
    src = "Qformer.bert.encoder.layer.0."
    assert torch.equal(
        lay.attention.attention.query.weight, sd[src + "attention.self.query.weight"]
    )
    assert torch.equal(
        lay.crossattention.attention.key.weight, sd[src + "crossattention.self.key.weight"]
    )
    assert torch.equal(model.lm_bias, sd["Qformer.cls.predictions.bias"])
    assert torch.equal(
        model.qformer.layernorm.weight, sd["Qformer.bert.embeddings.LayerNorm.weight"]
    )
    # through init_from (what qformer_pretrain calls)
    torch.save({"model": sd}, tmp_path / "blip2_pretrained.pth")
    got = foreign_state_dict(
        model, {"kind": "lavis_blip2", "path": str(tmp_path / "blip2_pretrained.pth")}
    )
    assert set(got) == set(mapped)


def test_refuses_leftover_missing_and_width():
    model = _model()
    sd = _lavis()
    sd["Qformer.bert.pooler.dense.weight"] = torch.zeros(32, 32)
    with pytest.raises(KeyMapError, match="pooler"):
        blip2_stage1_state_dict(model, sd)
    sd = _lavis()
    del sd["itm_head.bias"]
    with pytest.raises(KeyMapError, match="itm_head.bias"):
        blip2_stage1_state_dict(model, sd)
    wide = _lavis(vision_width=24)  # EVA-width Q-Former onto a 16-wide encoder
    with pytest.raises(KeyMapError, match="vision_side: skip"):
        blip2_stage1_state_dict(model, wide)
    mapped = blip2_stage1_state_dict(model, wide, vision_side="skip")
    assert (
        "ln_vision.weight" not in mapped
        and "qformer.encoder.layer.0.crossattention.attention.key.weight" not in mapped
    )
    assert "qformer.encoder.layer.0.crossattention.attention.query.weight" in mapped


def test_full_size_shapes_on_meta():
    with torch.device("meta"):
        model = Blip2Qformer(1408)  # bert-base sizes, EVA ViT-g width
    sd = lavis_qformer(
        layers=12,
        hidden=768,
        inter=3072,
        vision_width=1408,
        vocab=30523,
        max_pos=512,
        queries=32,
        device="meta",
    ) | lavis_stage1_heads(768, 256, device="meta")
    mapped = blip2_stage1_state_dict(model, sd)
    assert set(mapped) == set(model.state_dict())
    assert mapped["query_tokens"].shape == (1, 32, 768)


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_qformer_pretrain_starts_from_blip2_pretrained(tiny_towers, tmp_path):
    """``qformer_pretrain`` with ``init_from: {kind: lavis_blip2}`` through the CLI: the stage-1
    run starts from the LAVIS tensors (one step of AdamW later they are within a few lr)."""
    from safetensors.torch import load_file

    from medtune._cli.main import main

    sd = lavis_qformer(layers=2, hidden=32, inter=64, vision_width=64, vocab=65, max_pos=64,
                       queries=8) | lavis_stage1_heads(32, 16)  # fmt: skip
    torch.save({"model": sd}, tmp_path / "blip2_pretrained.pth")
    out = tmp_path / "stage1"
    with pytest.raises(SystemExit) as e:
        main(["run", "qformer_pretrain", "--config", "demo", f"towers_dir={tiny_towers}",
              f"output_dir={out}", "epochs=1", "max_steps_per_epoch=1", "val_dataset=null",
              "+init_from.kind=lavis_blip2", f"+init_from.path={tmp_path / 'blip2_pretrained.pth'}"])  # fmt: skip
    assert e.value.code in (0, None)
    saved = load_file(str(out / "epoch_0" / "model.safetensors"))
    src = sd["Qformer.bert.encoder.layer.0.crossattention.self.key.weight"]
    got = saved["qformer.encoder.layer.0.crossattention.attention.key.weight"]
    assert (got - src).abs().max() < 0.05 < src.abs().max()
