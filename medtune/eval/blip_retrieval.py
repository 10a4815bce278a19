"""BLIP's retrieval evaluation end to end (salesforce/BLIP ``train_retrieval.py::evaluation``):
ITC features of every caption (text mode, batches of 256) and every distinct image, the cosine
matrix, its top ``k_test`` re-scored by ITM + ITC (:func:`medtune.eval.rerank.rerank_topk`).
Score the result with :func:`medtune.eval.retrieval_metrics.itm_eval` (BLIP's ``itm_eval``).

What differs from BLIP's loop, none of it in the numbers: ``torch.inference_mode``; each ITM
forward holds whole rows' candidates up to ``itm_batch`` pairs (BLIP: one row of ``k_test``
per forward; the same at ``k_test`` 256); the padding columns that no caption of a forward uses
are cut (a padded key is masked out of every softmax, so the [ENC] output does not change).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from medtune.eval.rerank import rerank_topk


def _trim(input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """Drop the trailing columns where every row is padding."""
    used = attention_mask.any(0).nonzero()
    n = int(used.max()) + 1 if used.numel() else 1
    return input_ids[:, :n], attention_mask[:, :n]


@torch.inference_mode()
def blip_retrieval_scores(
    model,
    image_batches: Iterable[torch.Tensor],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    k_test: int,
    device: torch.device | str = "cpu",
    text_batch: int = 256,
    rank: int = 0,
    world: int = 1,
    itm_batch: int = 256,
) -> dict[str, torch.Tensor]:
    """ITC matrix and its ITM re-ranking.

    Args:
        model: a :class:`medtune.models.blip.Blip` (eval mode is the caller's business).
        image_batches: ``[b, 3, H, W]`` batches of the distinct images, in image-id order.
        input_ids, attention_mask: ``[n_texts, T]`` tokens of every caption.
        k_test: candidates re-scored per row.
        device: where the model runs; image tokens are kept on the CPU between passes (as BLIP).
        text_batch: captions per text-mode batch (BLIP: 256).
        rank, world: split of the re-ranked rows over ranks (all ranks return the full result).
        itm_batch: (image, caption) pairs per ITM forward, whole rows at a time (at least one
            row of ``k_test``).

    Returns:
        ``sim`` ``[n_images, n_texts]`` (ITC cosine), ``sim_i2t`` ``[n_images, n_texts]`` and
        ``sim_t2i`` ``[n_texts, n_images]`` (re-ranked).
    """
    feats = []
    for s in range(0, input_ids.shape[0], text_batch):
        ids, mask = _trim(input_ids[s : s + text_batch], attention_mask[s : s + text_batch])
        feats.append(model.text_feat(ids.to(device), mask.to(device)).float())
    text_embeds = torch.cat(feats)
    tokens, image_embeds = [], []
    for images in image_batches:
        tok = model.image_tokens(images.to(device))
        tokens.append(tok.cpu())
        image_embeds.append(model.image_feat(tok).float())
    image_tokens, image_embeds = torch.cat(tokens), torch.cat(image_embeds)
    sim = image_embeds @ text_embeds.t()

    def itm(ii: torch.Tensor, tj: torch.Tensor) -> torch.Tensor:
        ids, mask = _trim(input_ids[tj.cpu()], attention_mask[tj.cpu()])
        out = model.itm_logits(image_tokens[ii.cpu()].to(device), ids.to(device), mask.to(device))
        return out[:, 1].float()

    i2t, t2i = rerank_topk(sim, k_test, itm, rank=rank, world=world, pairs_per_call=itm_batch)
    return {"sim": sim.cpu(), "sim_i2t": i2t.cpu(), "sim_t2i": t2i.cpu()}
