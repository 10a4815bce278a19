"""medtune.models.blip and its key map (medtune.models.convert.blip).

- full size (ViT-B/16 + BERT-base with cross-attention + decoder) builds on ``meta``; its
  parameter counts equal the sums written out from BLIP's layer shapes;
- the decoder shares every block of the encoder but the self-attention (BLIP's
  ``tie_encoder_decoder_weights(..., '/attention')``);
- a state dict written with BLIP's names and shapes (``models/vit.py``, ``models/med.py``,
  ``blip_pretrain.py``: tied copies under both names, ``position_ids`` buffers, ``queue_ptr``)
  loads by name; leftover, missing and differing tied keys are refused by name; the retrieval
  model drops the decoder; ``pos_embed`` is resized;
- the losses: idx-aware ITC targets, LM label smoothing 0.1, ITM draws exclude positives.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medtune.models.blip import blip_model
from medtune.models.convert import KeyMapError
from medtune.models.convert.blip import blip_key_map, interpolate_pos_embed
from medtune.models.encoders import timm_vision

TINY_VIT = dict(image_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)


@pytest.fixture(scope="module")
def bert_dir(tiny_towers):
    return tiny_towers / "tiny_bert"


def _tiny(bert_dir, decoder=True, queue_size=32):
    torch.manual_seed(0)
    enc = timm_vision("vit_base_patch16_224", **TINY_VIT)
    return blip_model(
        enc, str(bert_dir), embed_dim=16, queue_size=queue_size, decoder=decoder, dropout=0.0
    )


# ----------------------------------------------------------------------------- full size
def _vit_params(w=768, depth=12, patch=16, tokens=197, mlp=3072):
    block = 2 * w + (w * 3 * w + 3 * w) + (w * w + w) + 2 * w + (w * mlp + mlp) + (mlp * w + w)
    return (3 * patch * patch * w + w) + w + tokens * w + depth * block + 2 * w


def _attn(h, kv):
    return (h * h + h) + 2 * (kv * h + h) + (h * h + h) + 2 * h


def test_full_size_builds_on_meta_with_blips_parameter_counts():
    with torch.device("meta"):
        enc = timm_vision("vit_base_patch16_224")
        model = blip_model(enc, None)
    h, inter, vocab, layers = 768, 3072, 30524, 12
    ffn = (h * inter + inter) + (inter * h + h) + 2 * h
    text = vocab * h + 512 * h + 2 * h + layers * (2 * _attn(h, h) + ffn)
    decoder_own = (
        layers * _attn(h, h) + (h * h + h + 2 * h) + vocab
    )  # self-attn, LM transform, bias
    heads = 2 * (h * 256 + 256) + (2 * h + 2) + 1  # projections, ITM head, temp
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    momentum = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert trained == _vit_params() + text + decoder_own + heads
    assert momentum == _vit_params() + text + 2 * (h * 256 + 256)
    assert 250e6 < trained < 260e6  # BLIP ViT-B pretraining model: ~252M trained weights
    assert tuple(model.image_queue.shape) == (256, 57600)
    assert model.text_encoder.encoder.layer[0].crossattention.self.key.weight.shape == (768, 768)
    # BiomedCLIP's tower (open_clip timm trunk) is the same ViT-B/16; its 512-d head is not taken
    from medtune.models.encoders import biomedclip_vision

    with torch.device("meta"):
        bm = blip_model(biomedclip_vision(None, device="meta"), None, decoder=False)
    assert sum(p.numel() for p in bm.visual_encoder.parameters()) == _vit_params()


def test_decoder_shares_all_but_self_attention(bert_dir):
    m = _tiny(bert_dir)
    enc, dec = m.text_encoder, m.text_decoder.bert
    assert dec.embeddings is enc.embeddings
    for le, ld in zip(enc.encoder.layer, dec.encoder.layer, strict=True):
        assert ld.crossattention is le.crossattention
        assert ld.intermediate is le.intermediate and ld.output is le.output
        assert ld.attention is not le.attention
        assert (
            ld.attention.self.query.weight.data_ptr() != le.attention.self.query.weight.data_ptr()
        )
    head = m.text_decoder.cls.predictions
    assert head.decoder.weight is enc.embeddings.word_embeddings.weight
    # both towers start from the BERT folder (self-attention equal at init, yet separate tensors)
    torch.testing.assert_close(
        dec.encoder.layer[0].attention.self.query.weight,
        enc.encoder.layer[0].attention.self.query.weight,
    )
    # momentum copies equal their online weights and get no gradient
    for p, pm in zip(m.text_encoder.parameters(), m.text_encoder_m.parameters(), strict=True):
        assert torch.equal(p, pm) and not pm.requires_grad


# ----------------------------------------------------------------------------- key map
def _vit_named(prefix, w, depth, tokens, patch, g):
    sd = {
        f"{prefix}.cls_token": torch.randn(1, 1, w, generator=g),
        f"{prefix}.pos_embed": torch.randn(1, tokens, w, generator=g),
        f"{prefix}.patch_embed.proj.weight": torch.randn(w, 3, patch, patch, generator=g),
        f"{prefix}.patch_embed.proj.bias": torch.randn(w, generator=g),
        f"{prefix}.norm.weight": torch.randn(w, generator=g),
        f"{prefix}.norm.bias": torch.randn(w, generator=g),
    }
    for i in range(depth):
        b = f"{prefix}.blocks.{i}"
        shapes = {
            "norm1.weight": (w,), "norm1.bias": (w,), "attn.qkv.weight": (3 * w, w),
            "attn.qkv.bias": (3 * w,), "attn.proj.weight": (w, w), "attn.proj.bias": (w,),
            "norm2.weight": (w,), "norm2.bias": (w,), "mlp.fc1.weight": (4 * w, w),
            "mlp.fc1.bias": (4 * w,), "mlp.fc2.weight": (w, 4 * w), "mlp.fc2.bias": (w,),
        }  # fmt: skip
        sd.update({f"{b}.{k}": torch.randn(*s, generator=g) for k, s in shapes.items()})
    return sd


def _bert_layer_named(prefix, h, inter, w, g, cross=True):
    def attn(name, kv):
        return {
            f"{name}.self.query.weight": (h, h), f"{name}.self.query.bias": (h,),
            f"{name}.self.key.weight": (h, kv), f"{name}.self.key.bias": (h,),
            f"{name}.self.value.weight": (h, kv), f"{name}.self.value.bias": (h,),
            f"{name}.output.dense.weight": (h, h), f"{name}.output.dense.bias": (h,),
            f"{name}.output.LayerNorm.weight": (h,), f"{name}.output.LayerNorm.bias": (h,),
        }  # fmt: skip

    shapes = attn("attention", h)
    if cross:
        shapes.update(attn("crossattention", w))
    shapes.update({
        "intermediate.dense.weight": (inter, h), "intermediate.dense.bias": (inter,),
        "output.dense.weight": (h, inter), "output.dense.bias": (h,),
        "output.LayerNorm.weight": (h,), "output.LayerNorm.bias": (h,),
    })  # fmt: skip
    return {f"{prefix}.{k}": torch.randn(*s, generator=g) for k, s in shapes.items()}


def _med_named(prefix, h, inter, layers, vocab, pos, w, g):
    sd = {
        f"{prefix}.embeddings.position_ids": torch.arange(pos).expand(1, -1).clone(),
        f"{prefix}.embeddings.word_embeddings.weight": torch.randn(vocab, h, generator=g),
        f"{prefix}.embeddings.position_embeddings.weight": torch.randn(pos, h, generator=g),
        f"{prefix}.embeddings.LayerNorm.weight": torch.randn(h, generator=g),
        f"{prefix}.embeddings.LayerNorm.bias": torch.randn(h, generator=g),
    }
    for i in range(layers):
        sd.update(_bert_layer_named(f"{prefix}.encoder.layer.{i}", h, inter, w, g))
    return sd


def blip_pretrain_state(h=32, inter=64, layers=2, vocab=66, pos=64, w=32, depth=2, tokens=17):
    """A state dict with BLIP_Pretrain's parameter names and shapes (tiny), as ``torch.save``
    of ``model.state_dict()`` writes it: tied weights under both names."""
    g = torch.Generator().manual_seed(1)
    sd = {}
    for p in ("visual_encoder", "visual_encoder_m"):
        sd.update(_vit_named(p, w, depth, tokens, 8, g))
    for p in ("text_encoder", "text_encoder_m"):
        sd.update(_med_named(p, h, inter, layers, vocab, pos, w, g))
    for p in ("vision_proj", "vision_proj_m"):
        sd[f"{p}.weight"], sd[f"{p}.bias"] = torch.randn(16, w, generator=g), torch.randn(16)
    for p in ("text_proj", "text_proj_m"):
        sd[f"{p}.weight"], sd[f"{p}.bias"] = torch.randn(16, h, generator=g), torch.randn(16)
    sd["itm_head.weight"], sd["itm_head.bias"] = torch.randn(2, h, generator=g), torch.randn(2)
    sd["temp"] = torch.tensor(0.05)
    sd["image_queue"] = F.normalize(torch.randn(16, 32, generator=g), dim=0)
    sd["text_queue"] = F.normalize(torch.randn(16, 32, generator=g), dim=0)
    sd["queue_ptr"] = torch.tensor([8])
    # the decoder: its own self-attention; everything else tied to the encoder (same values)
    dec = _med_named("text_decoder.bert", h, inter, layers, vocab, pos, w, g)
    for k in list(dec):
        src = k.replace("text_decoder.bert.", "text_encoder.")
        if ".attention." not in k:
            dec[k] = sd[src]
    sd.update(dec)
    sd["text_decoder.cls.predictions.bias"] = torch.randn(vocab, generator=g)
    sd["text_decoder.cls.predictions.transform.dense.weight"] = torch.randn(h, h, generator=g)
    sd["text_decoder.cls.predictions.transform.dense.bias"] = torch.randn(h, generator=g)
    sd["text_decoder.cls.predictions.transform.LayerNorm.weight"] = torch.randn(h, generator=g)
    sd["text_decoder.cls.predictions.transform.LayerNorm.bias"] = torch.randn(h, generator=g)
    sd["text_decoder.cls.predictions.decoder.weight"] = sd[
        "text_encoder.embeddings.word_embeddings.weight"
    ]
    sd["text_decoder.cls.predictions.decoder.bias"] = sd["text_decoder.cls.predictions.bias"]
    return sd


def test_blip_named_state_dict_loads_by_name(bert_dir):
    m = _tiny(bert_dir)
    sd = blip_pretrain_state()
    out = blip_key_map({f"module.{k}": v for k, v in sd.items()}, m, source="model_base.pth")
    own = dict(m.named_parameters())
    assert set(own) <= set(out)
    from medtune.models.blip.state import copy_into

    copy_into(m, out)
    own = dict(m.named_parameters())
    checks = {
        "visual_encoder.blocks.1.attn.qkv.weight": "visual_encoder.blocks.1.attn.qkv.weight",
        "text_encoder.encoder.layer.1.crossattention.self.key.weight":
            "text_encoder.encoder.layer.1.crossattention.self.key.weight",
        "text_decoder.bert.encoder.layer.0.attention.self.query.weight":
            "text_decoder.bert.encoder.layer.0.attention.self.query.weight",
        "text_encoder_m.encoder.layer.0.output.dense.weight":
            "text_encoder_m.encoder.layer.0.output.dense.weight",
        "temp": "temp",
    }  # fmt: skip
    for mine, theirs in checks.items():
        assert torch.equal(own[mine].detach(), sd[theirs]), mine
    dec = m.text_decoder
    assert torch.equal(dec.cls.predictions.bias.detach(), sd["text_decoder.cls.predictions.bias"])
    assert torch.equal(
        dec.bert.encoder.layer[1].crossattention.self.value.weight.detach(),
        sd["text_encoder.encoder.layer.1.crossattention.self.value.weight"],
    )
    assert torch.equal(m.image_queue, sd["image_queue"])  # same queue size: loaded, as BLIP
    assert int(m.queue_ptr) == 0  # the pointer is not carried over


def test_leftover_missing_and_untied_keys_are_refused_by_name(bert_dir):
    m = _tiny(bert_dir)
    sd = blip_pretrain_state()
    with pytest.raises(KeyMapError, match="text_encoder.pooler.dense.weight"):
        blip_key_map({**sd, "text_encoder.pooler.dense.weight": torch.zeros(32, 32)}, m)
    gone = dict(sd)
    del gone["itm_head.bias"]
    with pytest.raises(KeyMapError, match="missing keys for itm_head.bias"):
        blip_key_map(gone, m)
    bad = dict(sd)
    k = "text_decoder.bert.encoder.layer.0.intermediate.dense.weight"
    bad[k] = bad[k] + 1
    with pytest.raises(KeyMapError, match="tied tensor"):
        blip_key_map(bad, m)
    wrong = dict(sd)
    wrong["itm_head.weight"] = torch.zeros(3, 32)
    with pytest.raises(KeyMapError, match=r"itm_head.weight has shape \(3, 32\)"):
        blip_key_map(wrong, m)


def test_retrieval_model_drops_the_decoder_and_resizes_pos_embed(bert_dir):
    m = _tiny(bert_dir, decoder=False, queue_size=64)
    sd = blip_pretrain_state(tokens=1 + 8 * 8)  # trained at a larger image (8 x 8 patches)
    out = blip_key_map(sd, m)
    assert not any(k.startswith("text_decoder.") for k in out)
    assert tuple(out["visual_encoder.pos_embed"].shape) == (1, 17, 32)
    assert "image_queue" not in out  # 32 columns vs the model's 64: dropped, as BLIP
    assert torch.equal(out["visual_encoder.pos_embed"][:, 0], sd["visual_encoder.pos_embed"][:, 0])
    flat = interpolate_pos_embed(torch.ones(1, 1 + 64, 4), 16)
    torch.testing.assert_close(flat, torch.ones(1, 17, 4))


# ----------------------------------------------------------------------------- losses
def test_retrieval_itc_positives_follow_image_ids(bert_dir):
    from medtune.models.blip.losses import itc_targets
    from medtune.models.hard_negatives import draw_negatives

    idx = torch.tensor([0, 1, 0, 2])
    pos = idx[:, None] == idx[None, :]
    t = itc_targets(torch.zeros(4, 4), pos, alpha=0.0)
    torch.testing.assert_close(t[0], torch.tensor([0.5, 0.0, 0.5, 0.0]))
    torch.testing.assert_close(t.sum(1), torch.ones(4))
    w = torch.rand(4, 4).masked_fill(pos, 0)
    for s in range(20):
        neg = draw_negatives(w, torch.Generator().manual_seed(s), torch.arange(4))
        assert not pos[torch.arange(4), neg].any()


def test_forward_lm_loss_is_label_smoothed_ce_and_gradients_reach_every_weight(bert_dir):
    from medtune.models.blip import blip_tokenizer

    m = _tiny(bert_dir)
    tok = blip_tokenizer(str(bert_dir))
    x = tok(
        ["mri scan lesion", "ct scan of the chest", "no finding", "a lesion"] * 2,
        padding="max_length", max_length=10, truncation=True, return_tensors="pt",
    )  # fmt: skip
    images = torch.randn(8, 3, 32, 32)
    out = m(images, x.input_ids, x.attention_mask, alpha=0.4, sample_keys=torch.arange(8),
            generator=torch.Generator().manual_seed(0))  # fmt: skip
    out["loss"].backward()
    assert [n for n, p in m.named_parameters() if p.requires_grad and p.grad is None] == []
    with torch.no_grad():
        logits = m.lm_logits(m.image_tokens(images), x.input_ids, x.attention_mask)
        tgt = x.input_ids[:, 1:].masked_fill(x.input_ids[:, 1:] == 0, -100)
        ref = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                              ignore_index=-100, label_smoothing=0.1)  # fmt: skip
    torch.testing.assert_close(out["loss_lm"].detach(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        out["loss"].detach(), (out["loss_itc"] + out["loss_itm"] + out["loss_lm"]).detach()
    )
    assert int(m.queue_ptr) == 8 % 32
