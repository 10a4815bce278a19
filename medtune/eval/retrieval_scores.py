"""Score every image-text pair of a split with a dual encoder (ITC, optionally ITM re-ranking).

:func:`retrieval_scores` embeds the split's unique images and all its captions and returns the
matrices :mod:`medtune.eval.retrieval_metrics` scores (BLIP's ``itm_eval`` keys). Used by
``contrastive_pretrain`` (validation) and ``zero_shot_classify`` (retrieval mode). Moved here from
``medtune/training/contrastive.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from medtune.data.image_text import ImageTextDataset, caption_of


@torch.no_grad()
def retrieval_scores(
    model,
    tokenizer,
    samples,
    *,
    batch_size: int = 64,
    device="cpu",
    k_test: int = 128,
    num_workers: int = 0,
) -> dict:
    """Embed a split's unique images and all its captions; score every pair.

    Images are grouped by path, so a split with several captions per image is scored as BLIP does.
    With an ITM head, each image's ITC top-``k_test`` texts (and each text's top images) are
    re-scored as ITM logit + ITC similarity, the rest -100 (BLIP ``train_retrieval.py``).

    Returns:
        ``sim_i2t`` float [n_images, n_texts], ``txt2img`` int64 [n_texts], ``sim_t2i`` (ITM only),
        ``rule`` (a string naming the scoring).
    """
    keys, first, txt2img = {}, [], []
    for s in samples:
        key = str(s.images[0]) if len(s.images) == 1 else None
        if key not in keys:
            keys[key] = len(first)
            first.append(s)
        txt2img.append(keys[key])
    image_set = ImageTextDataset(first, model.transform)
    texts = [caption_of(s) for s in samples]
    loader = torch.utils.data.DataLoader(image_set, batch_size=batch_size, num_workers=num_workers)
    img_feats, img_tokens = [], []
    for images, _, _ in loader:
        pooled, tok = model.image_tower(images.to(device))
        img_feats.append(F.normalize(pooled, dim=-1).float().cpu())
        if model.itm is not None:
            img_tokens.append(tok.cpu())
    txt_feats, txt_tokens, txt_mask = [], [], []
    for s in range(0, len(texts), batch_size):
        pooled, tok, mask = model.text_tower(tokenizer(texts[s : s + batch_size]).to(device))
        txt_feats.append(F.normalize(pooled, dim=-1).float().cpu())
        if model.itm is not None:
            txt_tokens.append(tok.cpu())
            txt_mask.append(mask.cpu())
    img, txt = torch.cat(img_feats), torch.cat(txt_feats)
    sim = img @ txt.T
    out = {
        "sim_i2t": sim,
        "txt2img": torch.tensor(txt2img, dtype=torch.int64),
        "rule": "itc_cosine",
    }
    if model.itm is None:
        return out
    it, tt, tm = torch.cat(img_tokens), torch.cat(txt_tokens), torch.cat(txt_mask)

    def itm(ii: torch.Tensor, tj: torch.Tensor) -> torch.Tensor:
        logits = model.itm(it[ii].to(device), tt[tj].to(device), tm[tj].to(device))
        return logits[:, 1].float().cpu()

    k_t, k_i = min(k_test, sim.shape[1]), min(k_test, sim.shape[0])
    i2t = torch.full_like(sim, -100.0)
    for i in range(sim.shape[0]):
        top, idx = sim[i].topk(k_t)
        i2t[i, idx] = itm(torch.full_like(idx, i), idx) + top
    t2i = torch.full_like(sim.T, -100.0)
    for j in range(sim.shape[1]):
        top, idx = sim[:, j].topk(k_i)
        t2i[j, idx] = itm(idx, torch.full_like(idx, j)) + top
    out.update(sim_i2t=i2t, sim_t2i=t2i, rule=f"itm_logit_plus_itc_top{k_test}_else_-100")
    return out
