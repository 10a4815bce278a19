"""BLIP's learning-rate schedules (salesforce/BLIP ``utils.py``) as ``LambdaLR`` factories on the
optimizer's ``lr`` (= BLIP's ``init_lr``); step ``k`` is batch ``k % steps_per_epoch`` of epoch
``k // steps_per_epoch``.

- :func:`blip_pretrain_lr` (``pretrain.py``): ``step_lr_schedule`` each epoch,
  ``max(min_lr, init_lr * lr_decay_rate ** epoch)``, and in epoch 0 ``warmup_lr_schedule`` per
  batch, ``min(init_lr, warmup_lr + (init_lr - warmup_lr) * i / warmup_steps)``.
- :func:`blip_cosine_lr` (``train_retrieval.py``): ``cosine_lr_schedule`` per epoch,
  ``(init_lr - min_lr) * 0.5 * (1 + cos(pi * epoch / max_epoch)) + min_lr``.
"""

from __future__ import annotations

import math

import torch


def blip_pretrain_lr(
    optimizer: torch.optim.Optimizer,
    *,
    steps_per_epoch: int,
    warmup_steps: int = 3000,
    warmup_lr: float = 1e-6,
    min_lr: float = 1e-6,
    lr_decay_rate: float = 0.9,
    **_: object,
) -> torch.optim.lr_scheduler.LambdaLR:
    init = optimizer.param_groups[0]["lr"]

    def factor(k: int) -> float:
        epoch, i = divmod(k, steps_per_epoch)
        if epoch == 0:
            lr = min(init, warmup_lr + (init - warmup_lr) * i / max(warmup_steps, 1))
        else:
            lr = max(min_lr, init * lr_decay_rate**epoch)
        return lr / init

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def blip_cosine_lr(
    optimizer: torch.optim.Optimizer,
    *,
    steps_per_epoch: int,
    epochs: int,
    min_lr: float = 0.0,
    **_: object,
) -> torch.optim.lr_scheduler.LambdaLR:
    init = optimizer.param_groups[0]["lr"]

    def factor(k: int) -> float:
        epoch = k // steps_per_epoch
        return ((init - min_lr) * 0.5 * (1 + math.cos(math.pi * epoch / epochs)) + min_lr) / init

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
