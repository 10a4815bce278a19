"""One BLIP training run as plain functions, shared by ``blip_pretrain`` and ``blip_retrieval``.

Both recipes keep their loop in their own file; what their ``__init__``, ``setup``,
``save_checkpoint`` and per-step bookkeeping did identically lives here (as
:mod:`medtune.training.run` does for the fine-tuning recipes). salesforce/BLIP's ``pretrain.py``
and ``train_retrieval.py`` ``main`` are the model: build the model (``init_from`` a released or
medtune checkpoint), wrap it in DDP, the data with a distributed sampler, AdamW, the schedule.

A recipe reads::

    run = start_blip_run(cfg, "blip_pretrain", KNOWN_KEYS, max_length=30, alpha_warmup_epochs=2)
    setup_blip_run(run, decoder=True)
    ... its loop: blip_losses(run, batch, alpha, idx) -> backward -> step -> end_step(run, ...)
    save_blip_checkpoint(run, tag)

One process forms no process group and wraps nothing; under torchrun (``WORLD_SIZE > 1``) the
group is formed and the model wrapped in DDP (the queues are written identically on every rank,
so no buffer broadcast).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torchtune import config

from medtune.models.blip.state import blip_state
from medtune.training import checkpointing as ckpt
from medtune.training.blip_data import BlipCollate, BlipPairs
from medtune.training.blip_state import load_blip_state
from medtune.training.data import build_dataloader
from medtune.training.run import common_run_settings
from medtune.training.trackers import build_metric_logger
from medtune.utils.config import cfg_get, in_range, non_negative, positive
from medtune.utils.distributed import (
    all_reduce_sum,
    barrier,
    destroy,
)
from medtune.utils.errors import ConfigError

#: The top-level config keys both BLIP recipes read (``blip_retrieval`` adds its evaluation's;
#: ``medtune validate`` reads the union with ``ast``).
BLIP_KEYS = {
    "output_dir", "assets_dir", "towers_dir", "data_dir", "bert_dir", "vit_checkpoint", "init_from",
    "encoder", "model", "tokenizer", "dataset", "max_length", "max_words", "augment", "alpha",
    "alpha_warmup_epochs", "optimizer", "lr_scheduler", "metric_logger", "device", "autocast",
    "seed", "shuffle", "batch_size", "epochs", "max_steps_per_epoch", "clip_grad_norm",
    "num_workers", "log_every_n_steps", "save_every_n_steps", "resume_from_checkpoint",
}  # fmt: skip


@dataclass
class BlipRun:
    """Where a BLIP run stands: its processes, settings, position and (after
    :func:`setup_blip_run`) its model, data, optimizer and schedule.

    Attributes:
        name: the recipe's name (messages).
        cfg: the config.
        device, distributed, rank, world_size: this process and the processes of the run.
        output_dir: checkpoints, ``recipe_state.pt``, logs and plots.
        seed, batch_size (per process), epochs, max_steps_per_epoch, max_length, max_words,
        alpha, alpha_warmup (epochs), clip (grad norm), log_every, save_every, num_workers,
        autocast: the config's settings.
        epoch, global_step, batches_done: the position (batches done in the current epoch).
        loss_history: every step's all-rank mean of each loss.
        resume_rng: RNG states to restore just before the first resumed step.
        resumed: the recipe state a resumed run started from (None: a fresh run), for what a
            recipe saved of its own (:func:`save_blip_checkpoint`'s ``extra``).
        tokenizer, encoder, core (the :class:`medtune.models.blip.Blip`), model (``core`` or its
        DDP wrapper), params (trained parameters), train_set, loader, sampler, n_batches (steps
        per epoch), optimizer, scheduler, metric_logger: set by :func:`setup_blip_run`.
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
    max_steps_per_epoch: int | None
    max_length: int
    max_words: int
    alpha: float
    alpha_warmup: float
    clip: float | None
    log_every: int
    save_every: int | None
    num_workers: int
    autocast: bool
    epoch: int = 0
    global_step: int = 0
    batches_done: int = 0
    loss_history: list[dict[str, float]] = field(default_factory=list)
    resume_rng: Any = None
    resumed: dict | None = None
    tokenizer: Any = None
    encoder: Any = None
    core: Any = None
    model: Any = None
    params: list = field(default_factory=list)
    train_set: Any = None
    loader: Any = None
    sampler: Any = None
    n_batches: int = 0
    optimizer: Any = None
    scheduler: Any = None
    metric_logger: Any = None

    @property
    def is_rank_zero(self) -> bool:
        return self.rank == 0


def start_blip_run(
    cfg: DictConfig,
    name: str,
    known_keys: set[str],
    *,
    max_length: int,
    alpha_warmup_epochs: float,
) -> BlipRun:
    """Check the keys, read the settings, form the process group (under torchrun), seed.

    Args:
        cfg: the run's config.
        name: the recipe's name.
        known_keys: every top-level key the recipe reads.
        max_length: the default caption length in tokens (BLIP: 30 pretraining, 35 retrieval).
        alpha_warmup_epochs: the default ramp of ``alpha`` (BLIP: 2 in ``pretrain.py``, 1 in
            ``train_retrieval.py``).
    """
    settings = common_run_settings(cfg, name, known_keys)
    run = BlipRun(
        **settings,
        max_length=cfg_get(cfg, "max_length", int, max_length, check=positive()),
        max_words=cfg_get(cfg, "max_words", int, 30, check=positive()),
        alpha=cfg_get(cfg, "alpha", float, 0.4, check=in_range(0.0, 1.0)),
        alpha_warmup=cfg_get(
            cfg, "alpha_warmup_epochs", float, alpha_warmup_epochs, check=non_negative()
        ),
        num_workers=cfg_get(cfg, "num_workers", int, 0, check=non_negative()),
        autocast=cfg_get(cfg, "autocast", bool, False) and settings["device"].type == "cuda",
    )
    torch.manual_seed(run.seed)  # the same on every rank: identical init and queues
    return run


def setup_blip_run(run: BlipRun, *, decoder: bool) -> None:
    """Tokenizer, model (resumed, or ``init_from``), DDP, data, optimizer, schedule, logger.

    Args:
        run: from :func:`start_blip_run`.
        decoder: build the LM decoder (pretraining) or not (retrieval).

    Raises:
        ConfigError: tokenizer and model from different BERT folders; a queue that is not a
            multiple of the global batch.
    """
    cfg = run.cfg
    run.output_dir.mkdir(parents=True, exist_ok=True)
    state = None
    if cfg_get(cfg, "resume_from_checkpoint", bool, False):
        state = ckpt.load_recipe_state(run.output_dir)
    run.tokenizer = config.instantiate(cfg.tokenizer)
    run.encoder = config.instantiate(cfg.encoder)
    core = config.instantiate(cfg.model, vision=run.encoder, decoder=decoder)
    if (
        len(run.tokenizer) != core.config.vocab_size
        or run.tokenizer.enc_token_id != core.enc_token_id
        or run.tokenizer.bos_token_id != core.bos_token_id
    ):
        raise ConfigError(
            f"tokenizer: {len(run.tokenizer)} tokens but the model's text side has "
            f"{core.config.vocab_size}: tokenizer.path and model.bert_dir must name the same "
            "BERT folder"
        )
    init_from = cfg_get(cfg, "init_from", str, None)
    if state is not None:
        load_blip_state(core, run.output_dir / state["checkpoint"])
    elif init_from:
        from medtune.models.convert.blip import load_blip_init

        n = len(load_blip_init(core, init_from))
        if run.is_rank_zero:
            print(f"{run.name}: {n} tensors from {init_from}", flush=True)
    run.core = run.model = core.to(run.device)
    if run.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [run.device.index] if run.device.type == "cuda" else None
        # the queues are written identically on every rank: no buffer broadcast needed
        run.model = DDP(run.core, device_ids=ids, broadcast_buffers=False)
    run.train_set = blip_pairs(run, cfg.dataset, train=True)
    _, run.loader, run.sampler = build_dataloader(
        run.train_set,
        batch_size=run.batch_size,
        collate_fn=BlipCollate(run.tokenizer, run.max_length),
        shuffle=cfg_get(cfg, "shuffle", bool, True),
        seed=run.seed,
        rank=run.rank,
        world_size=run.world_size,
        num_workers=run.num_workers,
    )
    run.n_batches = len(run.loader)
    if run.max_steps_per_epoch is not None:
        run.n_batches = min(run.n_batches, run.max_steps_per_epoch)
    global_batch = run.batch_size * run.world_size
    if core.queue_size % global_batch:
        raise ConfigError(
            f"model.queue_size: {core.queue_size} is not a multiple of the global batch "
            f"{global_batch} (batch_size x processes), as BLIP's queue needs"
        )
    run.params = [p for p in run.core.parameters() if p.requires_grad]
    run.optimizer = config.instantiate(cfg.optimizer, run.params)
    run.scheduler = config.instantiate(
        cfg.lr_scheduler, run.optimizer, steps_per_epoch=run.n_batches, epochs=run.epochs
    )
    # rank 0 only; the resolved config is logged once
    run.metric_logger = build_metric_logger(cfg, run.is_rank_zero)
    if state is not None:
        _restore(run, state)
    if run.is_rank_zero:
        n_train = sum(p.numel() for p in run.params)
        n_all = sum(p.numel() for p in run.core.parameters())
        print(
            f"{run.name}: {n_train:,} trained parameters ({n_all - n_train:,} momentum "
            f"copies); {len(run.train_set)} pairs, {run.n_batches} steps/epoch x "
            f"{run.epochs} epochs, global batch {global_batch} ({run.world_size} "
            f"process(es), device {run.device})",
            flush=True,
        )


def blip_pairs(run: BlipRun, node: DictConfig, *, train: bool) -> BlipPairs:
    """The samples of a dataset config node as BLIP pairs, with the encoder's transform."""
    augment = run.cfg.get("augment")
    return BlipPairs(
        config.instantiate(node),
        run.encoder.transform,
        max_words=run.max_words,
        train=train,
        augment=OmegaConf.to_container(augment) if augment else None,
        seed=run.seed,
    )


def _restore(run: BlipRun, state: dict) -> None:
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.epoch, run.global_step = state["epoch"], state["global_step"]
    run.batches_done = state["batches_done"]
    run.loss_history = list(state["loss_history"])
    run.resume_rng = state["rng"]
    run.resumed = state
    if run.is_rank_zero:
        print(
            f"resumed from {run.output_dir / state['checkpoint']} at epoch {run.epoch}, "
            f"step {run.global_step} ({run.batches_done} batches into the epoch)",
            flush=True,
        )


def save_blip_checkpoint(run: BlipRun, tag: str, **extra: Any) -> None:
    """``output_dir/<tag>/`` (every model tensor once, BLIP's names; the config) and
    ``output_dir/recipe_state.pt`` (optimizer, scheduler, position, every RNG and the recipe's
    ``extra`` entries, back in ``run.resumed`` on resume), on rank 0."""
    if run.is_rank_zero:
        folder = run.output_dir / tag
        ckpt.save_trained(blip_state(run.core), folder, OmegaConf.to_yaml(run.cfg, resolve=True))
        ckpt.save_recipe_state(
            run.output_dir,
            {
                "checkpoint": tag,
                "epoch": run.epoch,
                "global_step": run.global_step,
                "batches_done": run.batches_done,
                "optimizer": run.optimizer.state_dict(),
                "scheduler": run.scheduler.state_dict(),
                "rng": ckpt.rng_state(),
                "seed": run.seed,
                "loss_history": run.loss_history,
                **extra,
            },
        )
        print(f"saved {folder}", flush=True)
    barrier()


# ---------------------------------------------------------------------- the loop's pieces
def restore_rng_once(run: BlipRun) -> None:
    """Restore a resumed run's RNG states (just before its first step; then a no-op)."""
    if run.resume_rng is not None:
        ckpt.set_rng_state(run.resume_rng)
        run.resume_rng = None


def alpha_at(run: BlipRun, epoch: int, i: int) -> float:
    """BLIP: ``alpha * min(1, (epoch * n + i) / (warmup_epochs * n))`` at batch ``i``."""
    if run.alpha_warmup == 0:
        return run.alpha
    n = run.n_batches
    return run.alpha * min(1.0, (epoch * n + i) / (run.alpha_warmup * n))


def step_generator(seed: int, step: int) -> torch.Generator:
    """The ITM draws of one step: the same on every rank and after a resume."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def blip_losses(
    run: BlipRun, batch: dict, alpha: float, idx: torch.Tensor | None
) -> dict[str, torch.Tensor]:
    """The model's losses on one collated batch (:class:`medtune.training.blip_data.BlipCollate`).

    Args:
        run: the run (its model, device, autocast, seed and step).
        batch: ``images [b, 3, H, W]``, ``input_ids`` / ``attention_mask [b, T]``, ``index [b]``.
        alpha: the distillation weight of this step.
        idx: ``[b]`` image ids (retrieval: captions of one image are positives) or None.
    """
    dev = run.device
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=run.autocast):
        return run.model(
            batch["images"].to(dev),
            batch["input_ids"].to(dev),
            batch["attention_mask"].to(dev),
            alpha=alpha,
            sample_keys=batch["index"].to(dev),
            idx=None if idx is None else idx.to(dev),
            generator=step_generator(run.seed, run.global_step),
        )


def end_step(
    run: BlipRun, out: dict[str, torch.Tensor], losses: tuple[str, ...], dt: float, alpha: float
) -> dict[str, float]:
    """After an update: advance the position, record the all-rank mean of each loss, log.

    Returns:
        ``{loss name: all-rank mean}``.
    """
    run.global_step += 1
    run.batches_done += 1
    mean = all_reduce_sum(torch.stack([out[k].detach().float() for k in losses])) / run.world_size
    metrics = dict(zip(losses, mean.tolist()))
    run.loss_history.append(metrics)
    if run.is_rank_zero and run.global_step % run.log_every == 0:
        lr = run.optimizer.param_groups[0]["lr"]
        logged = {**metrics, "lr": lr, "alpha": alpha, "step_seconds": dt}
        if run.metric_logger is not None:
            run.metric_logger.log_dict(logged, step=run.global_step)
        parts = " ".join(f"{k} {metrics[k]:.4f}" for k in losses)
        print(f"step {run.global_step} epoch {run.epoch} {parts} lr {lr:.2e}", flush=True)
    return metrics


def save_mid_epoch(run: BlipRun) -> bool:
    """Whether this step ends with a ``step_{n}`` checkpoint (``save_every_n_steps``; not on an
    epoch's last step, which the epoch checkpoint covers)."""
    return bool(
        run.save_every
        and run.global_step % run.save_every == 0
        and run.batches_done < run.n_batches
    )


def close_blip_run(run: BlipRun) -> None:
    """Close the metric logger; leave the process group."""
    if run.metric_logger is not None:
        run.metric_logger.close()
    destroy()
