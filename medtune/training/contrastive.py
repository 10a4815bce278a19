"""Losses for contrastive image-text pretraining (CLIP, BLIP / ALBEF).

- :class:`ContrastiveLoss` (a config ``_component_``): symmetric InfoNCE with the model's learnable
  temperature, through open_clip's ``ClipLoss``. Under torchrun the features are gathered across
  ranks with gradient (``gather_with_grad``), so N ranks x batch B see N*B negatives, and with
  ``local_loss`` each rank scores only its own rows against all columns (less memory, same
  gradient). Optional image-text matching (``itm_weight > 0``, BLIP): per row a hard negative text
  and a hard negative image are drawn from the whole (gathered) batch with probability
  softmax(similarity), the ITM head classifies the 3B pairs.
- :class:`MomentumQueue` (``queue_size > 0``, ALBEF / BLIP): a momentum copy of the towers and a
  queue of its past features; ITC against in-batch + queued momentum features with momentum
  distillation (``alpha``).

One process without a process group works everywhere (every collective is guarded). The hard
negatives come from a Gumbel-max draw over the global batch with a generator seeded by
``(seed, step)`` that every rank builds alike, so 2 ranks x B pick the same negatives as 1 process
with 2B: the loss and update are those of one process at the same global batch.

The image-caption dataset and its collate function live in :mod:`medtune.data.image_text`, the
retrieval scoring of a split in :mod:`medtune.eval.retrieval_scores` (both moved from here).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from medtune.utils.distributed import gather
from medtune.utils.distributed import world as dist_world


def hard_negatives(
    sim: torch.Tensor, positive: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Draw one negative column per row with probability softmax(sim row), the positive excluded.

    Args:
        sim: [B_global, B_global] similarity logits (no grad needed).
        positive: int [B_global], the positive column of each row.
        generator: a CPU generator; every rank must pass one in the same state.

    Returns:
        int [B_global] column indices (Gumbel-max: argmax of log-probabilities + Gumbel noise).
    """
    logp = torch.log_softmax(sim.float(), dim=1)
    logp[torch.arange(len(sim)), positive] = float("-inf")
    u = torch.rand(sim.shape, generator=generator).clamp_(1e-20, 1.0)
    return (logp + (-torch.log(-torch.log(u))).to(sim.device)).argmax(1)


class ContrastiveLoss(nn.Module):
    """ITC (open_clip ``ClipLoss``) + optional ITM with hard negatives.

    Args:
        local_loss: each rank computes the loss of its own rows against all gathered columns.
        gather_with_grad: gather features with gradient (the exact global-batch gradient).
        itm_weight: weight of the ITM loss (0: off; the model needs an ITM head).
        seed: seeds the hard-negative draws (with the step).
    """

    def __init__(
        self,
        local_loss: bool = False,
        gather_with_grad: bool = True,
        itm_weight: float = 0.0,
        seed: int = 0,
    ):
        super().__init__()
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.itm_weight = float(itm_weight)
        self.seed = int(seed)
        self._clip = None

    def clip_loss(self):
        from open_clip.loss import ClipLoss

        rank, world = dist_world()
        if self._clip is None or self._clip.world_size != world:
            self._clip = ClipLoss(
                local_loss=self.local_loss,
                gather_with_grad=self.gather_with_grad,
                cache_labels=True,
                rank=rank,
                world_size=world,
            )
        return self._clip

    def itc(self, out: dict[str, torch.Tensor]) -> torch.Tensor:
        """Args: out: the model's forward dict. Returns: scalar ITC loss (mean over the global batch
        when gathered without ``local_loss``; this rank's rows otherwise)."""
        return self.clip_loss()(out["image_features"], out["text_features"], out["logit_scale"])

    def itm(
        self,
        head: nn.Module,
        out: dict[str, torch.Tensor],
        step: int,
        ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """BLIP's ITM: positives, one hard negative text per image and one hard negative image per text.

        Args:
            head: the ITM head; out: the model's forward dict (``with_tokens=True``).
            step: the global step (seeds the draw).
            ids: int64 [b] dataset indices of the rows: the draw is made in the order of the
                gathered ids, so it does not depend on how the global batch is split over ranks.

        Returns:
            (loss scalar, accuracy scalar) over this rank's 3B pairs.
        """
        rank, _ = dist_world()
        b = out["image_features"].shape[0]
        dev = out["image_features"].device
        with torch.no_grad():
            img_all = gather(out["image_features"], False)
            txt_all = gather(out["text_features"], False)
            sim = img_all @ txt_all.T * out["logit_scale"].detach()
            n = len(sim)
            ids_all = gather(ids.to(dev), False) if ids is not None else torch.arange(n, device=dev)
            order = ids_all.argsort()  # canonical position -> gathered position
            sim_c = sim[order][:, order]
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(step))
            pos = torch.arange(n, device=dev)
            neg_txt, neg_img = torch.empty_like(pos), torch.empty_like(pos)
            neg_txt[order] = order[hard_negatives(sim_c, pos, g)]
            neg_img[order] = order[hard_negatives(sim_c.T, pos, g)]
            neg_txt, neg_img = (
                neg_txt[rank * b : (rank + 1) * b],
                neg_img[rank * b : (rank + 1) * b],
            )
        it_all = gather(out["image_tokens"], True)
        tt_all = gather(out["text_tokens"], True)
        tm_all = gather(out["text_mask"], False)
        it, tt, tm = out["image_tokens"], out["text_tokens"], out["text_mask"]
        image_tokens = torch.cat([it, it, it_all[neg_img]])
        text_tokens = torch.cat([tt, tt_all[neg_txt], tt])
        text_mask = torch.cat([tm, tm_all[neg_txt], tm])
        logits = head(image_tokens, text_tokens, text_mask)
        labels = torch.cat([torch.ones(b), torch.zeros(2 * b)]).long().to(logits.device)
        loss = F.cross_entropy(logits, labels)
        acc = (logits.argmax(1) == labels).float().mean()
        return loss, acc

    def forward(
        self,
        out: dict[str, torch.Tensor],
        itm_head: nn.Module | None = None,
        step: int = 0,
        ids: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Args: out: the model's forward dict; itm_head, step, ids: see :meth:`itm`.

        Returns: ``loss`` (to backward), ``itc``, and with ITM ``itm`` and ``itm_acc``."""
        res = {"itc": self.itc(out)}
        res["loss"] = res["itc"]
        if self.itm_weight > 0:
            if itm_head is None:
                raise ValueError(
                    "loss.itm_weight > 0 but the model has no ITM head (set model.itm=True)"
                )
            res["itm"], res["itm_acc"] = self.itm(itm_head, out, step, ids)
            res["loss"] = res["loss"] + self.itm_weight * res["itm"]
        return res


class MomentumQueue(nn.Module):
    """A momentum copy of the towers and a queue of its features (ALBEF / BLIP ITC).

    Args:
        model: the dual encoder to copy (before any DDP wrapping).
        queue_size: features kept per modality (a multiple of the global batch keeps it aligned).
        momentum: EMA factor of the momentum towers.
        alpha: momentum-distillation weight of the soft targets (0: one-hot targets only).
    """

    def __init__(
        self, model: nn.Module, queue_size: int, momentum: float = 0.995, alpha: float = 0.4
    ):
        super().__init__()
        self.model_m = copy.deepcopy(model)
        if getattr(self.model_m, "itm", None) is not None:
            self.model_m.itm = None  # only the towers are averaged
        for p in self.model_m.parameters():
            p.requires_grad_(False)
        d = model.embed_dim
        self.register_buffer("image_queue", F.normalize(torch.randn(d, queue_size), dim=0))
        self.register_buffer("text_queue", F.normalize(torch.randn(d, queue_size), dim=0))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.queue_size = queue_size
        self.momentum = momentum
        self.alpha = alpha

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """EMA of ``model``'s tower weights (the same on every rank: the weights are)."""
        own = dict(model.named_parameters())
        for n, pm in self.model_m.named_parameters():
            pm.mul_(self.momentum).add_(own[n].detach(), alpha=1 - self.momentum)

    def loss(
        self,
        model: nn.Module,
        out: dict[str, torch.Tensor],
        images: torch.Tensor,
        tokens: torch.Tensor,
    ) -> torch.Tensor:
        """ITC of this rank's batch against its momentum features + the queue, then enqueue.

        Args:
            model: the (unwrapped) trained model, for the EMA update.
            out: its forward dict on ``images`` / ``tokens``.

        Returns: scalar loss.
        """
        scale = out["logit_scale"]
        with torch.no_grad():
            self.update(model)
            m = self.model_m(images, tokens)
            img_m, txt_m = m["image_features"], m["text_features"]
            img_all = torch.cat([img_m.T, self.image_queue.clone()], 1)
            txt_all = torch.cat([txt_m.T, self.text_queue.clone()], 1)
            b = img_m.shape[0]
            targets = torch.zeros(b, img_all.shape[1], device=img_m.device)
            targets[:, :b] = torch.eye(b, device=img_m.device)
            s = scale.detach()
            soft_i2t = self.alpha * F.softmax(img_m @ txt_all * s, 1) + (1 - self.alpha) * targets
            soft_t2i = self.alpha * F.softmax(txt_m @ img_all * s, 1) + (1 - self.alpha) * targets
        li = -(F.log_softmax(out["image_features"] @ txt_all * scale, 1) * soft_i2t).sum(1).mean()
        lt = -(F.log_softmax(out["text_features"] @ img_all * scale, 1) * soft_t2i).sum(1).mean()
        self._enqueue(gather(img_m, False), gather(txt_m, False))
        return (li + lt) / 2

    @torch.no_grad()
    def _enqueue(self, img: torch.Tensor, txt: torch.Tensor) -> None:
        n, q = img.shape[0], self.queue_size
        idx = (int(self.ptr) + torch.arange(n, device=img.device)) % q
        self.image_queue[:, idx] = img.T
        self.text_queue[:, idx] = txt.T
        self.ptr.fill_((int(self.ptr) + n) % q)
