"""ITC top-k re-ranked by ITM: BLIP's retrieval evaluation (salesforce/BLIP ``train_retrieval.py``
``evaluation``), as a function of the ITC matrix and an ITM scorer.

For each image ``i`` the ``k_test`` texts of highest ITC similarity get ``ITM(i, t)[match] +
sim[i, t]``; every other text scores -100. Text -> image likewise over the columns of ``sim``.
Under torchrun each rank scores a contiguous block of rows (BLIP's ``step = n // world + 1``) and
the blocks are summed across ranks (here onto zeros, so the result does not depend on the number
of ranks; BLIP's all-reduce of -100-filled matrices adds -100 per other rank, which shifts whole
rows and leaves the ranking alone). The matrices go to
:func:`medtune.eval.retrieval_metrics.itm_eval` as ``sim_i2t`` / ``sim_t2i``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

ItmScorer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _rows(n: int, rank: int, world: int) -> range:
    step = n // world + 1
    start = rank * step
    return range(start, min(n, start + step))


@torch.no_grad()
def rerank_topk(
    sim: torch.Tensor,
    k_test: int,
    itm_score: ItmScorer,
    *,
    rank: int = 0,
    world: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BLIP's re-ranked score matrices.

    Args:
        sim: ``[n_images, n_texts]`` ITC cosine similarities (BLIP's ``sims_matrix``, no temp).
        k_test: candidates re-scored per row (BLIP: 256 on COCO; capped at the candidates).
        itm_score: ``(image_idx [k], text_idx [k]) -> [k]`` the ITM "match" logit of each pair.
        rank, world: this process's share of the rows; with ``world > 1`` and a process group the
            matrices are summed over ranks (without one, other ranks' rows stay 0).

    Returns:
        ``(score_i2t [n_images, n_texts], score_t2i [n_texts, n_images])`` float32 on
        ``sim``'s device.
    """
    n_img, n_txt = sim.shape
    sim = sim.float()
    i2t = torch.zeros(n_img, n_txt, device=sim.device)
    t2i = torch.zeros(n_txt, n_img, device=sim.device)
    k_t, k_i = min(k_test, n_txt), min(k_test, n_img)
    for i in _rows(n_img, rank, world):
        top, idx = sim[i].topk(k_t)
        i2t[i] = -100.0
        i2t[i, idx] = itm_score(torch.full_like(idx, i), idx).float() + top
    sim_t = sim.t()
    for j in _rows(n_txt, rank, world):
        top, idx = sim_t[j].topk(k_i)
        t2i[j] = -100.0
        t2i[j, idx] = itm_score(idx, torch.full_like(idx, j)).float() + top
    import torch.distributed as dist

    if world > 1 and dist.is_available() and dist.is_initialized():
        dist.all_reduce(i2t)
        dist.all_reduce(t2i)
    return i2t, t2i
