"""One training run's settings and position, shared by the fine-tuning recipes as plain functions.

``vision_finetune``, ``full_finetune`` and ``lora_finetune`` each keep their loop in their own
file; what they did identically lives here (moved out of the five recipe files that preceded
them: their ``__init__``, ``_restore``, the recipe-state dict of ``save_checkpoint`` and
``cleanup``). litgpt's ``finetune/lora.py`` keeps its run in a ``state`` dict handed to
``fit(fabric, state, ...)``; :class:`Run` is that dict with names.

One file serves 1..N processes: under torchrun (``WORLD_SIZE > 1``) the process group is formed
and the model is FSDP2-sharded; one process forms no process group and wraps nothing (the
collectives in :mod:`medtune.utils.distributed` are no-ops then), so a single device keeps
the plain single-device path and its memory (QLoRA included).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from medtune.training import checkpointing as ckpt
from medtune.training.optim import restore_lr_scheduler
from medtune.utils.config import cfg_get, check_keys, positive
from medtune.utils.distributed import (
    barrier,
    destroy,
    init_process_group,
    is_distributed_env,
    resolve_device,
)

#: The top-level config keys every fine-tuning recipe reads (a recipe adds its own:
#: ``KNOWN_KEYS = FINETUNE_KEYS | {"save_merged"}``; ``medtune validate`` reads both with ``ast``).
FINETUNE_KEYS = {
    "output_dir", "assets_dir", "data_dir", "model_dir", "encoder_dir",
    "tokenizer", "model", "checkpointer", "trainable", "llm_dtype", "autocast", "device",
    "dataset", "val_dataset", "prompt_template", "system_prompt", "augment", "blank_images",
    "window", "max_seq_len", "seed", "shuffle", "batch_size", "epochs", "max_steps_per_epoch",
    "gradient_accumulation_steps", "optimizer", "lr", "lr_scheduler", "loss", "clip_grad_norm",
    "enable_activation_checkpointing", "metric_logger", "log_every_n_steps", "num_workers",
    "resume_from_checkpoint", "save_every_n_steps", "packed", "group_by_length", "compile",
}  # fmt: skip


@dataclass
class Run:
    """Where a fine-tuning run stands: its processes, its loop settings and its position.

    Attributes:
        name: the recipe's name (error lines, start-up table).
        cfg: the resolved config.
        device: this process's device.
        distributed: launched by torchrun with more than one process (FSDP2, collectives).
        rank, world_size: this process's rank and the number of processes.
        output_dir: checkpoints, logs and plots go here.
        seed, batch_size (per process), epochs, accum (gradient accumulation steps),
        max_steps_per_epoch, log_every, save_every (mid-epoch checkpoints), clip (max grad norm):
            the loop's settings, read from the config keys of the same meaning.
        epoch, global_step, batches_done (micro-batches into the epoch), loss_history (one mean
        loss per optimizer step): the position, saved in ``recipe_state.pt`` and restored.
        steps_per_epoch: optimizer steps per epoch (set by
            :func:`medtune.training.finetune_setup.setup_optimizer`).
        tokenizer, model, loss_fn, metric_logger, data, optimizer, lr_scheduler: what
            :func:`medtune.training.finetune_setup.setup_run` builds (None before).
    """

    name: str
    cfg: DictConfig
    device: torch.device
    distributed: bool
    rank: int
    world_size: int
    output_dir: Path
    seed: int
    batch_size: int
    epochs: int
    accum: int
    max_steps_per_epoch: int | None
    log_every: int
    save_every: int | None
    clip: float | None
    epoch: int = 0
    global_step: int = 0
    batches_done: int = 0
    loss_history: list[float] = field(default_factory=list)
    steps_per_epoch: int = 1
    tokenizer: Any = None
    model: torch.nn.Module | None = None
    loss_fn: Any = None
    metric_logger: Any = None
    data: Any = None  # medtune.training.finetune_setup.Data
    optimizer: torch.optim.Optimizer | None = None
    lr_scheduler: Any = None
    meter: Any = None  # medtune.training.loop.StepMeter, while training

    @property
    def is_rank_zero(self) -> bool:
        return self.rank == 0


def common_run_settings(cfg: DictConfig, name: str, known_keys: set[str]) -> dict[str, Any]:
    """Check the config's keys, pick the device, join the process group under torchrun, and read
    the settings every training run has (the fine-tuning :class:`Run` and BLIP's run share them).

    Args:
        cfg: the recipe's config.
        name: the recipe's name.
        known_keys: the top-level keys the recipe reads (an unknown one is a one-line error).

    Returns:
        name, cfg, device, distributed, rank, world_size, output_dir, seed, batch_size, epochs,
        max_steps_per_epoch, log_every, save_every, clip: keyword arguments of the run dataclass.
    """
    check_keys(cfg, known_keys, name)
    device = resolve_device(cfg_get(cfg, "device", str, "auto"))
    distributed = is_distributed_env()  # one script: in-process or under torchrun
    rank, world_size = init_process_group(device) if distributed else (0, 1)
    return dict(
        name=name,
        cfg=cfg,
        device=device,
        distributed=distributed,
        rank=rank,
        world_size=world_size,
        output_dir=Path(cfg_get(cfg, "output_dir", str)),
        seed=cfg_get(cfg, "seed", int, 0),
        batch_size=cfg_get(cfg, "batch_size", int, check=positive()),
        epochs=cfg_get(cfg, "epochs", int, check=positive()),
        max_steps_per_epoch=cfg_get(cfg, "max_steps_per_epoch", int, None, check=positive()),
        log_every=cfg_get(cfg, "log_every_n_steps", int, 1, check=positive()),
        save_every=cfg_get(cfg, "save_every_n_steps", int, None, check=positive()),
        clip=cfg_get(cfg, "clip_grad_norm", float, None, check=positive()),
    )


def start_run(cfg: DictConfig, name: str, known_keys: set[str]) -> Run:
    """Check the config's keys, pick the device, join the process group under torchrun, seed.

    Args:
        cfg: the recipe's config.
        name: the recipe's name.
        known_keys: the top-level keys the recipe reads (an unknown one is a one-line error).

    Returns:
        The run at epoch 0, step 0.
    """
    run = Run(
        **common_run_settings(cfg, name, known_keys),
        accum=cfg_get(cfg, "gradient_accumulation_steps", int, 1, check=positive()),
    )
    ckpt.seed_everything(run.seed)  # the same seed on every rank: identical initial weights
    return run


def resume_state(run: Run) -> dict[str, Any] | None:
    """Create ``output_dir``; the saved recipe state when ``resume_from_checkpoint`` is set."""
    run.output_dir.mkdir(parents=True, exist_ok=True)
    if cfg_get(run.cfg, "resume_from_checkpoint", bool, False):
        return ckpt.load_recipe_state(run.output_dir)
    return None


def restore(run: Run, state: dict[str, Any]) -> None:
    """Optimizer, schedule, position and RNGs of the interrupted run (the RNGs last: nothing may
    draw between here and the next step)."""
    ckpt.load_optimizer_state(run.model, run.optimizer, state["optimizer"], run.distributed)
    restore_lr_scheduler(run.lr_scheduler, run.optimizer, state["scheduler"])
    run.epoch, run.global_step = state["epoch"], state["global_step"]
    run.batches_done = state["batches_done"]
    run.loss_history = list(state.get("loss_history", []))
    ckpt.set_rng_state(state["rng"])
    if run.is_rank_zero:
        print(
            f"resumed from {run.output_dir / state['checkpoint']} at epoch {run.epoch}, "
            f"step {run.global_step} ({run.batches_done} batches into the epoch)",
            flush=True,
        )


def save_run(run: Run, tag: str, write: Callable[[dict[str, torch.Tensor], Path], None]) -> None:
    """Write ``output_dir/<tag>/`` through ``write`` and ``output_dir/recipe_state.pt``.

    A collective under FSDP2: every rank calls it. The model's full state dict, the optimizer's
    full state and every rank's RNGs are gathered; rank 0 then calls ``write(full, folder)`` (the
    recipe's own files: trained parts, LLM export, adapters) and saves the recipe state.

    Args:
        run: the run (its model, optimizer, schedule and position are saved).
        tag: the checkpoint folder's name (``epoch_0``, ``step_4``).
        write: the recipe's writer of ``folder`` from the full CPU state dict (rank 0 only).
    """
    full = ckpt.gather_full_state(run.model, run.distributed, run.device)  # collective
    optim = ckpt.optimizer_state(run.model, run.optimizer, run.distributed)  # collective
    rng = ckpt.rng_states()  # collective: every rank's RNGs
    if run.is_rank_zero:
        folder = run.output_dir / tag
        write(full, folder)
        ckpt.save_recipe_state(
            run.output_dir,
            {
                "checkpoint": tag,
                "epoch": run.epoch,
                "global_step": run.global_step,
                "batches_done": run.batches_done,
                "optimizer": optim,
                "scheduler": run.lr_scheduler.state_dict(),
                "rng": rng,
                "seed": run.seed,
                "loss_history": run.loss_history,
            },
        )
        print(f"saved {folder}", flush=True)
    barrier()


def config_yaml(run: Run, **overrides: Any) -> str:
    """The resolved config as YAML for a checkpoint folder, with top-level blocks updated
    (``checkpointer={...}``: a full fine-tune points its checkpointer at its own ``llm/``)."""
    out = OmegaConf.to_container(run.cfg, resolve=True)
    for key, value in overrides.items():
        out[key].update(value)
    return OmegaConf.to_yaml(OmegaConf.create(out))


def finish(run: Run) -> None:
    """Close the metric logger and leave the process group (the recipes' ``cleanup``)."""
    if run.metric_logger is not None:
        run.metric_logger.close()
    destroy()
