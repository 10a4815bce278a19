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


def _score_rows(
    sim: torch.Tensor,
    rows: range,
    k: int,
    score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    out: torch.Tensor,
    pairs_per_call: int,
) -> None:
    """Fill ``out[r]`` for each row r: -100, its top-k columns ``score(r, cols) + sim``.

    The rows are scored ``max(1, pairs_per_call // k)`` at a time: one call holds their k
    candidates each (BLIP's ``evaluation`` makes one call per row).
    """
    per_call = max(1, pairs_per_call // k)
    for start in range(rows.start, rows.stop, per_call):
        block = torch.arange(start, min(rows.stop, start + per_call), device=sim.device)
        top, idx = sim[block].topk(k, dim=1)  # [r, k]
        query = block.view(-1, 1).expand(-1, k)
        logits = score(query.reshape(-1), idx.reshape(-1)).float().view(-1, k)
        out[block] = -100.0
        out[block.view(-1, 1), idx] = logits + top


@torch.inference_mode()
def rerank_topk(
    sim: torch.Tensor,
    k_test: int,
    itm_score: ItmScorer,
    *,
    rank: int = 0,
    world: int = 1,
    pairs_per_call: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BLIP's re-ranked score matrices.

    Args:
        sim: ``[n_images, n_texts]`` ITC cosine similarities (BLIP's ``sims_matrix``, no temp).
        k_test: candidates re-scored per row (BLIP: 256 on COCO; capped at the candidates).
        itm_score: ``(image_idx [p], text_idx [p]) -> [p]`` the ITM "match" logit of each pair.
        rank, world: this process's share of the rows; with ``world > 1`` and a process group the
            matrices are summed over ranks (without one, other ranks' rows stay 0).
        pairs_per_call: at most this many pairs per ``itm_score`` call, whole rows at a time (at
            least one row): ``k_test`` 256 is one row per call as BLIP; small ``k_test`` packs
            several rows into one forward pass.

    Returns:
        ``(score_i2t [n_images, n_texts], score_t2i [n_texts, n_images])`` float32 on
        ``sim``'s device.
    """
    n_img, n_txt = sim.shape
    sim = sim.float()
    i2t = torch.zeros(n_img, n_txt, device=sim.device)
    t2i = torch.zeros(n_txt, n_img, device=sim.device)
    rows_i, rows_t = _rows(n_img, rank, world), _rows(n_txt, rank, world)
    _score_rows(sim, rows_i, min(k_test, n_txt), itm_score, i2t, pairs_per_call)
    _score_rows(
        sim.t(), rows_t, min(k_test, n_img), lambda t, i: itm_score(i, t), t2i, pairs_per_call
    )
    import torch.distributed as dist

    if world > 1 and dist.is_available() and dist.is_initialized():
        dist.all_reduce(i2t)
        dist.all_reduce(t2i)
    return i2t, t2i
