"""BLIP-2 stage-1 Q-Former: BERT initialisation, shapes, losses, hard negatives, ITG mask, 2-rank
gradients, the stage-2 connector, and full-size parameter counts on ``meta``."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.nn.functional as F

from medtune.models.blip2.qformer import bert_tokenizer, blip2_qformer, sample_hard_negatives
from medtune.testing.towers import TINY_BERT, write_tiny_bert

W = 24  # encoder width of the tests


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return write_tiny_bert(tmp_path_factory.mktemp("bert") / "tiny_bert")


@pytest.fixture(scope="module")
def batch(bert_dir):
    tok = bert_tokenizer(str(bert_dir))
    t = tok(
        ["a chest x ray", "normal lung scan", "ct of the lung with a lesion", "mri", "no finding"],
        padding="max_length",
        max_length=10,
        truncation=True,
        return_tensors="pt",
    )
    g = torch.Generator().manual_seed(3)
    return torch.randn(5, 6, W, generator=g), t["input_ids"], t["attention_mask"], tok


def _model(bert_dir, **kw):
    torch.manual_seed(0)
    return blip2_qformer(W, str(bert_dir), num_query_tokens=4, embed_dim=8, **kw)


def test_bert_init_dec_token_and_temperature(bert_dir):
    from transformers import BertModel

    m = _model(bert_dir)
    bert = BertModel.from_pretrained(str(bert_dir)).state_dict()
    own = dict(m.named_parameters())
    n_vocab = bert["embeddings.word_embeddings.weight"].shape[0]
    assert own["embeddings.word_embeddings.weight"].shape[0] == n_vocab + 1  # + [DEC]
    assert torch.equal(
        own["embeddings.word_embeddings.weight"][:n_vocab],
        bert["embeddings.word_embeddings.weight"],
    )
    assert torch.equal(own["qformer.layernorm.weight"], bert["embeddings.LayerNorm.weight"])
    for i in range(TINY_BERT["num_hidden_layers"]):
        pre = f"qformer.encoder.layer.{i}."
        assert torch.equal(
            own[pre + "attention.attention.value.weight"],
            bert[f"encoder.layer.{i}.attention.self.value.weight"],
        )
        # the query FFN starts as BERT's FFN (LAVIS copies the weights into the *_query blocks)
        assert torch.equal(
            own[pre + "output_query.dense.weight"], bert[f"encoder.layer.{i}.output.dense.weight"]
        )
        assert torch.equal(
            own[pre + "intermediate.dense.weight"], own[pre + "intermediate_query.dense.weight"]
        )
        # cross-attention every other layer, from the encoder width
        has_cross = pre + "crossattention.attention.key.weight" in own
        assert has_cross == (i % 2 == 0)
        if has_cross:
            assert own[pre + "crossattention.attention.key.weight"].shape == (
                TINY_BERT["hidden_size"],
                W,
            )
    tok = bert_tokenizer(str(bert_dir))
    assert tok.convert_tokens_to_ids("[DEC]") == m.bos_token_id == n_vocab == len(tok) - 1
    assert m.temp.item() == pytest.approx(0.07) and m.temp.requires_grad
    assert m.query_tokens.shape == (1, 4, TINY_BERT["hidden_size"])


def test_shapes_losses_finite_and_every_parameter_gets_a_gradient(bert_dir, batch):
    img, ids, mask, _ = batch
    m = _model(bert_dir)
    q, ln = m.encode_image(img)
    h = TINY_BERT["hidden_size"]
    assert q.shape == (5, 4, h) and ln.shape == img.shape
    assert m.image_feats(q).shape == (5, 4, 8) and m.text_feat(m.encode_text(ids, mask)).shape == (
        5,
        8,
    )
    assert m.itm_logits(ln, ids, mask).shape == (5, 2)
    assert m.lm_logits(ln, ids, mask).shape == (5, 10, m.config.vocab_size)
    out = m(img, ids, mask, generator=torch.Generator().manual_seed(0))
    assert set(out) == {"loss", "loss_itc", "loss_itm", "loss_itg"}
    assert all(torch.isfinite(v) for v in out.values())
    assert out["loss"].item() == pytest.approx(
        sum(out[k].item() for k in ("loss_itc", "loss_itm", "loss_itg")), rel=1e-6
    )
    out["loss"].backward()
    assert [n for n, p in m.named_parameters() if p.grad is None] == []


def test_itc_is_max_over_queries_with_label_smoothing(bert_dir, batch):
    img, ids, mask, _ = batch
    m = _model(bert_dir).eval()
    out = m(img, ids, mask, generator=torch.Generator().manual_seed(0))
    f_i = m.image_feats(m.encode_image(img)[0])
    f_t = m.text_feat(m.encode_text(ids, mask))
    sim = (
        torch.stack([torch.stack([(f_i[a] @ f_t[b]).max() for b in range(5)]) for a in range(5)])
        / 0.07
    )
    y = torch.arange(5)
    want = (
        F.cross_entropy(sim, y, label_smoothing=0.1)
        + F.cross_entropy(sim.t(), y, label_smoothing=0.1)
    ) / 2
    assert out["loss_itc"].item() == pytest.approx(want.item(), rel=1e-5)


def test_hard_negatives_exclude_positives_follow_the_weights_and_ignore_batch_order():
    g = torch.Generator().manual_seed(0)
    m = 6
    sim = torch.randn(m, m, generator=g)
    sim[:, 3] += 8.0  # column 3 is the hardest negative of every other row
    sim.fill_diagonal_(5.0)  # a strong positive: it must still never be drawn
    draws = torch.stack(
        [sample_hard_negatives(sim, torch.Generator().manual_seed(s)) for s in range(400)]
    )
    assert not (draws == torch.arange(m)).any()
    assert (draws[:, [0, 1, 2, 4, 5]] == 3).float().mean() > 0.9
    # a permuted batch with the same keys gives every sample the same negative sample
    keys = torch.tensor([10, 4, 7, 1, 9, 2])
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    a = sample_hard_negatives(sim, torch.Generator().manual_seed(5), keys)
    b = sample_hard_negatives(sim[perm][:, perm], torch.Generator().manual_seed(5), keys[perm])
    assert torch.equal(keys[perm][b], keys[a][perm])


def test_itg_mask_text_causal_queries_blind_to_text(bert_dir, batch):
    img, ids, mask, _ = batch
    m = _model(bert_dir).eval()
    ln = m.encode_image(img)[1]
    full = torch.ones_like(mask)
    base = m.lm_logits(ln, ids, full)
    later = ids.clone()
    later[:, 5:] = 7  # change tokens from position 5 on
    changed = m.lm_logits(ln, later, full)
    torch.testing.assert_close(changed[:, :5], base[:, :5], rtol=1e-5, atol=1e-6)  # causal
    assert not torch.allclose(changed[:, 5:], base[:, 5:])
    # the text sees the queries, hence the image
    other = m.lm_logits(m.encode_image(img.flip(0))[1], ids, full)
    assert not torch.allclose(other[:, 0], base[:, 0])


# ----------------------------------------------------------------------------- 2 ranks (gloo)
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, port, bert_dir, img, ids, mask, out):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    m = _model(bert_dir)
    sl = slice(rank * 3, rank * 3 + 3)
    res = m(
        img[sl],
        ids[sl],
        mask[sl],
        generator=torch.Generator().manual_seed(1),
        sample_keys=torch.arange(6)[sl],
    )
    res["loss"].backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    for g in grads.values():
        dist.all_reduce(g)
        g /= 2  # as DDP averages
    losses = torch.stack([res[k].detach() for k in ("loss_itc", "loss_itm", "loss_itg")])
    dist.all_reduce(losses)
    if rank == 0:
        torch.save({"losses": losses / 2, "grads": grads}, out)
    dist.destroy_process_group()


def test_two_ranks_give_the_one_process_losses_and_gradients(bert_dir, tmp_path):
    import torch.multiprocessing as mp

    tok = bert_tokenizer(str(bert_dir))
    texts = [
        "a chest x ray",
        "normal lung",
        "ct of the lung",
        "mri lesion",
        "no finding",
        "a nodule",
    ]
    t = tok(texts, padding="max_length", max_length=10, truncation=True, return_tensors="pt")
    img = torch.randn(6, 6, W, generator=torch.Generator().manual_seed(2))
    out = tmp_path / "two.pt"
    # forked, not spawned: a spawned rank re-imports torch, transformers and medtune (seconds of
    # CPU each); each forked rank sets one thread and builds its own gloo group
    mp.start_processes(
        _rank_main,
        args=(_free_port(), bert_dir, img, t["input_ids"], t["attention_mask"], out),
        nprocs=2,
        start_method="fork",
    )
    two = torch.load(out, weights_only=True)
    m = _model(bert_dir)
    res = m(
        img,
        t["input_ids"],
        t["attention_mask"],
        generator=torch.Generator().manual_seed(1),
        sample_keys=torch.arange(6),
    )
    res["loss"].backward()
    one = torch.stack([res[k].detach() for k in ("loss_itc", "loss_itm", "loss_itg")])
    torch.testing.assert_close(two["losses"], one, rtol=1e-5, atol=1e-6)
    for n, p in m.named_parameters():
        torch.testing.assert_close(two["grads"][n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


# ----------------------------------------------------------------------------- full size on meta
def _bert_base_qformer_count(vision_width: int, vocab: int = 30523, q: int = 32) -> int:
    """BLIP-2's Q-Former from bert-base-uncased, counted from its parts (LAVIS layout)."""
    h, ffn, layers, lin = 768, 3072, 12, lambda i, o: i * o + o
    ln = 2 * h
    emb = vocab * h + 512 * h + ln  # word (+[DEC]) and position embeddings, LayerNorm
    self_attn = 4 * lin(h, h) + ln
    ffn_block = lin(h, ffn) + lin(ffn, h) + ln
    cross = (
        2 * lin(h, h) + 2 * lin(vision_width, h) + ln
    )  # query, output; key, value from the image
    body = layers * (self_attn + 2 * ffn_block) + (layers // 2) * cross  # text + query FFN
    heads = (
        (lin(h, h) + ln + vocab) + 2 * lin(h, 256) + lin(h, 2) + 1
    )  # LM head (tied), ITC, ITM, temp
    return emb + body + heads + q * h + 2 * vision_width  # queries, ln_vision


@pytest.mark.parametrize("width", [1408, 768, 256])  # EVA ViT-g (LAVIS), BiomedCLIP, SAM
def test_full_size_qformer_builds_on_meta_with_the_derived_count(width):
    with torch.device("meta"):
        m = blip2_qformer(width)
    assert sum(p.numel() for p in m.parameters()) == _bert_base_qformer_count(width)
    if width == 1408:
        assert sum(p.numel() for p in m.parameters()) == 186_705_470  # BLIP-2 paper: "188M"


def test_stage2_connector_full_size_count_and_forward_shape():
    from medtune.models.blip2.connector import Blip2QFormerConnector

    with torch.device("meta"):
        c = Blip2QFormerConnector(768, 4096)
    h, lin = 768, lambda i, o: i * o + o
    per_layer = 4 * lin(h, h) + 2 * h + lin(h, 3072) + lin(3072, h) + 2 * h  # self-attn + query FFN
    cross = 2 * lin(h, h) + 2 * lin(768, h) + 2 * h
    want = 2 * h + 12 * per_layer + 6 * cross + 32 * h + 2 * 768 + lin(h, 4096)
    assert sum(p.numel() for p in c.parameters()) == want
    assert c.num_tokens(196) == 32
    dims = {
        k: TINY_BERT[k]
        for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    }
    tiny = Blip2QFormerConnector(W, 40, num_query_tokens=3, **dims)
    assert tiny(torch.randn(2, 5, W)).shape == (2, 3, 40)
    assert math.isfinite(tiny(torch.randn(1, 5, W)).sum().item())
