"""BLIP's re-ranked retrieval evaluation (medtune.eval.rerank, medtune.eval.blip_retrieval)
against a direct computation on a tiny BLIP: ITM of every (image, text) pair, each row's ITC
top-k kept as ITM + ITC, everything else -100."""

from __future__ import annotations

import pytest
import torch

from medtune.eval.blip_retrieval import blip_retrieval_scores
from medtune.eval.rerank import rerank_topk
from medtune.eval.retrieval_metrics import itm_eval


@pytest.fixture(scope="module")
def tiny(tiny_towers):
    from medtune.models.blip import blip_model, blip_tokenizer
    from medtune.models.encoders import timm_vision

    torch.manual_seed(0)
    enc = timm_vision(
        "vit_base_patch16_224", image_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2
    )
    bert = str(tiny_towers / "tiny_bert")
    model = blip_model(enc, bert, embed_dim=16, queue_size=16, decoder=False, dropout=0.0).eval()
    return model, blip_tokenizer(bert)


def test_reranked_matrices_equal_a_direct_computation(tiny):
    model, tok = tiny
    captions = ["mri scan lesion", "ct scan", "no finding", "a lesion in the upper left",
                "chest x ray", "normal scan", "mass in the lower right"]  # fmt: skip
    x = tok(captions, padding="max_length", max_length=12, truncation=True, return_tensors="pt")
    images = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    k = 3
    out = blip_retrieval_scores(
        model, [images[:2], images[2:]], x.input_ids, x.attention_mask, k_test=k, text_batch=4
    )
    with torch.no_grad():
        tokens = model.image_tokens(images)
        img = model.image_feat(tokens)
        txt = model.text_feat(x.input_ids, x.attention_mask)
        sim = img @ txt.T
        itm = torch.empty(5, 7)
        for i in range(5):  # every pair, one at a time
            for j in range(7):
                logit = model.itm_logits(tokens[i : i + 1], x.input_ids[j : j + 1],
                                         x.attention_mask[j : j + 1])  # fmt: skip
                itm[i, j] = logit[0, 1]
    want_i2t = torch.full((5, 7), -100.0)
    for i in range(5):
        top = sim[i].topk(k).indices
        want_i2t[i, top] = itm[i, top] + sim[i, top]
    want_t2i = torch.full((7, 5), -100.0)
    for j in range(7):
        top = sim[:, j].topk(k).indices
        want_t2i[j, top] = itm[top, j] + sim[top, j]
    torch.testing.assert_close(out["sim"], sim, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["sim_i2t"], want_i2t, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["sim_t2i"], want_t2i, rtol=1e-5, atol=1e-5)
    assert (out["sim_i2t"] == -100).sum() == 5 * (7 - k)
    # one row per ITM forward (BLIP's loop; no padding shared across rows) gives the same matrices
    one = blip_retrieval_scores(
        model, [images], x.input_ids, x.attention_mask, k_test=k, itm_batch=1
    )
    for m in ("sim_i2t", "sim_t2i"):
        torch.testing.assert_close(one[m], out[m], rtol=1e-5, atol=1e-5)
    txt2img = torch.tensor([0, 1, 2, 3, 4, 0, 1])
    res = itm_eval(out["sim_i2t"], out["sim_t2i"], txt2img)
    assert set(res) >= {"txt_r1", "img_r10", "r_mean"}


def test_rerank_rows_split_over_ranks_give_the_same_matrix():
    sim = torch.randn(6, 9, generator=torch.Generator().manual_seed(0))
    itm = torch.randn(6, 9, generator=torch.Generator().manual_seed(1))

    def score(ii, tj):
        return itm[ii, tj]

    full = rerank_topk(sim, 4, score)
    # 3 ranks (no process group here): each fills its block of rows; the blocks sum to the whole
    parts = [rerank_topk(sim, 4, score, rank=r, world=3) for r in range(3)]
    for m in (0, 1):
        assert all((p[m] != 0).any(1).sum() < full[m].shape[0] for p in parts)
        torch.testing.assert_close(sum(p[m] for p in parts), full[m])
    # rows packed into one scorer call or one row per call: the same matrices
    calls = []

    def counted(ii, tj):
        calls.append(len(ii))
        return itm[ii, tj]

    for per_call, sizes in ((4, [4] * 6 + [4] * 9), (9, [8] * 3 + [8] * 4 + [4])):
        calls.clear()
        got = rerank_topk(sim, 4, counted, pairs_per_call=per_call)
        assert calls == sizes
        torch.testing.assert_close(got[0], full[0])
        torch.testing.assert_close(got[1], full[1])
    # k_test larger than the candidates: every entry re-scored, none -100
    i2t, t2i = rerank_topk(sim, 50, score)
    torch.testing.assert_close(i2t, itm + sim)
    torch.testing.assert_close(t2i, (itm + sim).T)
