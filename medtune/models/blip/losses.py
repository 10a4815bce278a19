"""BLIP's losses as functions of features (salesforce/BLIP ``models/blip_pretrain.py`` and
``models/blip_retrieval.py``, ``forward``), written so that N ranks x batch b give the loss of one
process with batch N*b:

- ITC with momentum distillation (:func:`itc_distilled`): each row against the momentum features
  of the *whole global batch* and the queue (BLIP: of its own rank's batch and the queue; the
  global batch is what makes the split over ranks irrelevant); targets ``alpha * softmax(momentum
  similarities) + (1 - alpha) * positives``, where the positives are the diagonal (pretraining)
  or every candidate with the same image id, queue included, normalised per row (retrieval,
  BLIP's ``idx``-aware ``sim_targets``).
- ITM hard negatives: one per row from the softmaxed similarities of the global batch with the
  positives at zero (BLIP's ``torch.multinomial``), drawn by
  :func:`medtune.models.hard_negatives.draw_negatives` (inverse CDF, one generator seeded alike
  on every rank, rows visited in dataset-index order, so the draw of a sample does not depend on
  its rank or position).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def itc_targets(sim_m: torch.Tensor, positives: torch.Tensor, alpha: float) -> torch.Tensor:
    """``alpha * softmax(sim_m) + (1 - alpha) * positives / positives.sum(1)``.

    Args:
        sim_m: ``[b, C]`` momentum similarities / temp against the C candidates.
        positives: ``[b, C]`` bool, the candidates that are positives of each row.
        alpha: the distillation weight (BLIP 0.4, ramped up from 0).

    Returns:
        ``[b, C]`` soft targets, each row summing to 1.
    """
    pos = positives.float()
    hard = pos / pos.sum(1, keepdim=True)
    return alpha * F.softmax(sim_m, dim=1) + (1 - alpha) * hard


def itc_distilled(sim: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``-sum(log_softmax(sim) * targets, 1).mean()`` (BLIP's ``loss_i2t`` / ``loss_t2i``).

    Args:
        sim: ``[b, C]`` similarities / temp (with gradient); targets: ``[b, C]`` soft targets.
    """
    return -(F.log_softmax(sim, dim=1) * targets).sum(1).mean()
