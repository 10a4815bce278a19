"""Optimizer and learning-rate schedule of the training recipes: parameter groups per part.

The optimizer and the schedule are config components (``optimizer._component_``,
``lr_scheduler._component_``); the learning rate is set per trained part (``lr.encoder``,
``lr.connector``, ``lr.llm``), each part one parameter group named after it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torchtune import config

from medtune.training.params import model_parts
from medtune.utils.errors import ConfigError


def param_groups(model: nn.Module, lrs: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One optimizer group per trained part.

    Args:
        model: a MedVLM (parts encoder / connector / llm) or a bare decoder (part llm).
        lrs: part -> learning rate (``cfg.lr``).

    Returns:
        ``[{"params": [...], "lr": float, "name": part}, ...]`` for the parts that train.

    Raises:
        ConfigError: a trained part without a learning rate, or one that is not a positive number.
    """
    groups = []
    for part, module in model_parts(model).items():
        params = [p for p in module.parameters() if p.requires_grad]
        if not params:
            continue
        if part not in lrs:
            raise ConfigError(f"lr.{part}: missing learning rate for the trained part '{part}'")
        try:
            lr = float(lrs[part])
        except (TypeError, ValueError):
            raise ConfigError(f"lr.{part}: expected a number, got {lrs[part]!r}") from None
        if not lr > 0:
            raise ConfigError(f"lr.{part}: must be > 0, got {lr}")
        groups.append({"params": params, "lr": lr, "name": part})
    return groups


def build_optimizer(
    optimizer_cfg: DictConfig, groups: list[dict[str, Any]]
) -> torch.optim.Optimizer:
    """Instantiate ``optimizer_cfg`` over ``groups``.

    ``bitsandbytes`` optimizers (CUDA only) fall back to ``torch.optim.AdamW`` with the same
    arguments when bitsandbytes is not installed, with a printed note.
    """
    try:
        return config.instantiate(optimizer_cfg, groups)
    except (ImportError, ModuleNotFoundError) as e:
        if "bitsandbytes" not in str(optimizer_cfg.get("_component_", "")):
            raise
        kwargs = {
            k: v
            for k, v in OmegaConf.to_container(optimizer_cfg).items()
            if k not in ("_component_", "optim_bits", "is_paged")
        }
        print(
            f"optimizer: {optimizer_cfg._component_} unavailable ({e}); using torch.optim.AdamW",
            flush=True,
        )
        return torch.optim.AdamW(groups, **kwargs)


def build_lr_scheduler(
    scheduler_cfg: DictConfig | None, optimizer: torch.optim.Optimizer, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Instantiate the schedule (e.g. torchtune's ``get_cosine_schedule_with_warmup``) with
    ``num_training_steps=total_steps``; none given: a constant rate."""
    if scheduler_cfg is None or scheduler_cfg.get("_component_") is None:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    return config.instantiate(scheduler_cfg, optimizer, num_training_steps=total_steps)


def restore_lr_scheduler(
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
) -> None:
    """Load a schedule's state, keeping this run's schedule length (a run may be resumed with more
    epochs), and set every group's learning rate for the restored step."""
    scheduler.load_state_dict(state)
    step = scheduler.last_epoch
    if hasattr(scheduler, "lr_lambdas"):
        for group, fn, base in zip(
            optimizer.param_groups, scheduler.lr_lambdas, scheduler.base_lrs
        ):
            group["lr"] = base * fn(step)
