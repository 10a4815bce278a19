"""Data, losses and metrics of MAVL's fine-tuning (classification and SIIM-ACR segmentation).

Followed: ``Finetuning/classification/{train_res_ft.py,dataset/dataset.py}`` and
``Finetuning/segmentation/{train_res_ft.py,utils.py,metric.py}`` of HieuPhan33/CVPR2024_MAVL:

- **label fraction**: ``int(fraction * n)`` training items drawn without replacement (MAVL's
  ``np.random.choice(..., replace=False)``, there unseeded and not stratified; here seeded);
- classification: ``BCEWithLogitsLoss`` over the classes (unknown labels masked out);
- segmentation: ``DiceBCELoss`` (sigmoid, ``BCE + 1 - (2 I + 1) / (sum p + sum t + 1)`` over the
  whole batch) and the ``dice`` metric: per image at probability 0.5, an image without mask scores 1
  if nothing is predicted, else 0; mean over images.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from medtune.utils.errors import ConfigError


def label_fraction(items: list, fraction: float, seed: int) -> list:
    """``int(fraction * len(items))`` items drawn without replacement with ``seed`` (order kept)."""
    if not 0 < fraction <= 1:
        raise ConfigError(f"label_fraction: {fraction} is not in (0, 1]")
    if fraction == 1:
        return list(items)
    n = int(fraction * len(items))
    if n == 0:
        raise ConfigError(f"label_fraction: {fraction} of {len(items)} images keeps none")
    keep = sorted(random.Random(seed).sample(range(len(items)), n))
    return [items[i] for i in keep]


class FinetuneImages(torch.utils.data.Dataset):
    """Labelled images -> ``(image [3, S, S], target, known)``.

    ``task="classification"``: target float ``[C]`` (0/1), known bool ``[C]``;
    ``task="segmentation"``: target float ``[1, S, S]`` (the item's boxes / run-length masks,
    nearest-resized), known ``True``. Augmentation is seeded per ``(seed, epoch, index)``; it is
    applied to images only, so segmentation trains without it (as MAVL's segmentation datasets
    when ``is_train`` only resizes).
    """

    def __init__(self, items, task: str, classes: list[str] | None, image_size: int, *,
                 train: bool = False, augment: dict | None = None, seed: int = 0) -> None:  # fmt: skip
        from medtune.data.image_transforms import IMAGENET_MEAN, IMAGENET_STD, image_transform

        self.items, self.task, self.classes, self.size = (
            list(items),
            task,
            classes or [],
            image_size,
        )
        self.augmenting = bool(train and augment and task == "classification")
        self.transform = image_transform(image_size, IMAGENET_MEAN, IMAGENET_STD, train=self.augmenting,
                                         augment=augment)  # fmt: skip
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        from medtune.data.images import load_image

        it = self.items[i]
        image = load_image(it.image)
        if self.augmenting:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed((self.seed * 1_000_003 + self.epoch) * 10_000_019 + i)
                x = self.transform(image)
        else:
            x = self.transform(image)
        if self.task == "segmentation":
            from medtune.eval.mavl_zero_shot import target_mask

            m = torch.from_numpy(target_mask(it, self.size, self.size)).float()[None]
            return x, m, torch.tensor(True)
        known = torch.tensor([c in it.labels for c in self.classes])
        y = torch.tensor([float(it.labels.get(c, 0)) for c in self.classes])
        return x, y, known


def masked_bce(
    logits: torch.Tensor,
    target: torch.Tensor,
    known: torch.Tensor,
    total: torch.Tensor | None = None,
) -> torch.Tensor:
    """``BCEWithLogitsLoss`` over the known labels: their mean, or with ``total`` their sum divided
    by it (a recipe under DDP passes the global count of known labels / world size, so that the
    averaged gradients are the global batch's)."""
    if total is None:
        return F.binary_cross_entropy_with_logits(logits[known], target[known])
    loss = F.binary_cross_entropy_with_logits(logits[known], target[known], reduction="sum")
    return loss / total.clamp(min=1e-12)  # no known label anywhere: a zero sum, a zero loss


def dice_bce_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """MAVL's ``DiceBCELoss`` over the whole batch."""
    p = torch.sigmoid(logits).reshape(-1)
    t = target.reshape(-1)
    inter = (p * t).sum()
    return F.binary_cross_entropy(p, t) + 1 - (2 * inter + smooth) / (p.sum() + t.sum() + smooth)


def mavl_dice(prob: torch.Tensor, truth: torch.Tensor, threshold: float = 0.5) -> dict[str, float]:
    """MAVL's ``metric.dice``: ``prob``, ``truth`` ``[N, ...]``. Returns dice, dice_pos, dice_neg, n_pos, n_neg."""
    p = (prob.reshape(len(prob), -1) > threshold).float()
    t = (truth.reshape(len(truth), -1) > 0.5).float()
    pos = t.sum(-1) >= 1
    d_pos = 2 * (p * t).sum(-1) / (p + t).sum(-1).clamp(min=1e-12)
    d_neg = (p.sum(-1) == 0).float()
    per = torch.where(pos, d_pos, d_neg)
    return {"dice": float(per.mean()), "dice_pos": float(d_pos[pos].mean()) if pos.any() else 0.0,
            "dice_neg": float(d_neg[~pos].mean()) if (~pos).any() else 0.0,
            "n_pos": int(pos.sum()), "n_neg": int((~pos).sum())}  # fmt: skip
