"""MAVL's pretraining losses: entity presence CE, location contrastive, global concept-image.

Followed: ``Pretrain/models/model_MAVL.py`` ``MAVL.forward`` (``is_train=True``) and
``Pretrain/models/loss.py`` ``SoftTargetCrossEntropy`` of HieuPhan33/CVPR2024_MAVL:

- ``ce``: cross-entropy of the ``[B*E, 2]`` presence logits on labels 0/1; labels -1 (unknown) and
  2 (uncertain) are left out; times ``ce``.
- ``cl`` (location): for each entity present in the report (label 1), its location embedding
  against the anatomy book rows of its 8 candidate locations (the true one first): CE with target 0.
- ``global``: per concept k of ``global_concept_idx``, the ``[B, E]`` cosines scaled by
  ``exp(temp[k])``; soft-target CE over entities (image-to-text) and over the batch (text-to-image,
  the transpose) with the 0/1 presence labels (-1 and 2 -> 0) as unnormalised targets; both are
  ``sum(-target * log_softmax) / (B * E)``; mean over concepts; times ``cl_global``.
- ``loss = ce + cl + global``; ``exclude_class`` keeps :data:`KEEP_ENTITIES` only for ``ce``/``cl``.

Across ranks (``world > 1``) the loss equals one process with the global batch: each sum is divided
by its global count (all-reduced), and the text-to-image term sees every rank's rows (gathered with
gradient). The returned ``loss`` is scaled so that DDP's gradient mean gives the global gradient;
the logged parts are the global values. Where no entity of the (global) batch is present the
location term is 0 (MAVL's ``F.cross_entropy`` of nothing would be NaN).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medtune.models.mavl.books import KEEP_ENTITIES


def _world() -> tuple[int, bool]:
    import torch.distributed as dist

    on = dist.is_available() and dist.is_initialized()
    return (dist.get_world_size() if on else 1), on


def _sum_all(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    world, on = _world()
    if on and world > 1:
        t = t.clone()
        dist.all_reduce(t)
    return t


def _gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's rows (dim 0) keeping this rank's gradient path."""
    world, on = _world()
    if not on or world == 1:
        return t
    import torch.distributed as dist
    import torch.distributed.nn.functional as dnn

    parts = list(dnn.all_gather(t))
    parts[dist.get_rank()] = t  # local rows keep their own graph
    return torch.cat(parts)


class MAVLLoss(nn.Module):
    """Args:
    ce: weight of the presence CE (MAVL: 1.0).
    cl_global: weight of the global concept-image term (MAVL_resnet.yaml: 0.1).
    location: train the location contrastive term (MAVL's ``no_cl: False``).
    exclude_class: score the presence and location terms on :data:`KEEP_ENTITIES` only.
    """

    def __init__(
        self,
        ce: float = 1.0,
        cl_global: float = 0.1,
        location: bool = True,
        exclude_class: bool = False,
    ) -> None:
        super().__init__()
        self.ce, self.cl_global, self.location, self.exclude_class = (
            ce,
            cl_global,
            location,
            exclude_class,
        )

    def forward(self, model, out: dict, labels: torch.Tensor, loc_index: torch.Tensor) -> dict:
        """Args:
            model: the (unwrapped) :class:`~medtune.models.mavl.MAVL` (books, temperatures, entities).
            out: its forward output; labels: int ``[B, E]`` in {-1, 0, 1, 2};
            loc_index: int64 ``[B, E, 8]`` anatomy rows (the true location first when present).

        Returns: ``{"loss": backward this, "ce", "cl", "global"}`` (the parts detached, global values).
        """
        world, _ = _world()
        logits, location = out["logits"], out["location"]
        b, e = labels.shape
        keep = torch.ones(e, dtype=torch.bool, device=labels.device)
        if self.exclude_class:
            keep = torch.tensor([n in KEEP_ENTITIES for n in model.entities], device=labels.device)
        known = ((labels == 0) | (labels == 1)) & keep
        ce_sum = F.cross_entropy(logits[known].float(), labels[known].long(), reduction="sum")
        zero = logits.new_zeros(())
        if self.location:
            pos = (labels == 1) & keep
            cand = model.anatomy_book[loc_index[pos]]  # [n, 8, T]
            sim = torch.bmm(cand, location[pos].unsqueeze(-1)).squeeze(-1)  # [n, 8]
            target = torch.zeros(sim.shape[0], dtype=torch.long, device=sim.device)
            cl_sum = F.cross_entropy(sim.float(), target, reduction="sum")
        else:
            pos, cl_sum = known[:0], zero
        counts = _sum_all(torch.stack([known.sum(), pos.sum()]).float())
        n_ce, n_cl = counts[0].clamp(min=1), counts[1].clamp(min=1)
        n_b = float(b * world)

        soft = labels.clone()
        soft[(soft == -1) | (soft == 2)] = 0
        soft = soft.float()
        glob = out["global_logits"].float()
        k_all = model.n_concepts
        all_soft = _gather_rows(soft)
        i2t_sum, t2i = zero, zero
        for i, k in enumerate(model.global_concept_idx):
            scaled = glob[:, k::k_all] * model.temp[i].exp()  # [B, E]
            i2t_sum = i2t_sum + (-soft * scaled.log_softmax(-1)).sum()
            full = _gather_rows(scaled)  # [B_global, E]
            t2i = t2i + (-all_soft * full.log_softmax(0)).sum() / (n_b * e)
        n_k = len(model.global_concept_idx)
        i2t_local = i2t_sum / (n_b * e) / n_k
        t2i = t2i / n_k

        # DDP averages gradients over ranks: local sums are scaled by world; the gathered
        # text-to-image term already carries every rank's gradient (all_gather's backward sums).
        ce_part = self.ce * ce_sum / n_ce
        cl_part = cl_sum / n_cl
        loss = world * (ce_part + cl_part + self.cl_global * i2t_local) + self.cl_global * t2i
        with torch.no_grad():
            parts = _sum_all(torch.stack([ce_part, cl_part, i2t_local]).detach())
            return {"loss": loss, "ce": parts[0], "cl": parts[1],
                    "global": self.cl_global * (parts[2] + t2i.detach())}  # fmt: skip
