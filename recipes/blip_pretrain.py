"""BLIP pretraining: ITC with momentum distillation and a queue, ITM through the image-grounded text
encoder, LM through the image-grounded text decoder (salesforce/BLIP ``pretrain.py``,
``models/blip_pretrain.py``; the brain-abnormality VLP seed's pipeline).

    medtune run blip_pretrain --config demo
    medtune run blip_pretrain --config pubmed_brain data_dir=/data/pubmed_brain \\
        bert_dir=/models/bert-base-uncased vit_checkpoint=/models/deit_base_patch16_224.pth
    medtune run --nproc_per_node 8 blip_pretrain --config pubmed_brain ...
    medtune run blip_retrieval --config pubmed_brain init_from=outputs/blip_pretrain_pubmed_brain/epoch_19

Features (all set in the config):

- **Model** (``model``: ``medtune.models.blip.blip_model``): the ``encoder`` ViT (any timm ViT
  through ``medtune.models.encoders.timm_vision``, e.g. ViT-B/16 from DeiT weights as BLIP, or
  BiomedCLIP's tower through ``biomedclip_vision``), a BERT with cross-attention in every layer
  and a decoder sharing all but its self-attention, both from the local HF BERT folder
  ``bert_dir`` (bert-base-uncased as BLIP, PubMedBERT, BiomedCLIP's text tower), 256-d
  projections, momentum copies (``momentum`` 0.995) and queues (``queue_size``, a multiple of the
  global batch). ``tokenizer``: that folder's BERT tokenizer with ``[DEC]`` and ``[ENC]``.
  ``init_from``: start from a released BLIP ``model_base.pth`` (key map
  :mod:`medtune.models.convert.blip`) or a medtune BLIP checkpoint folder.
- **Losses** (each logged: ``loss_itc``, ``loss_itm``, ``loss_lm``, and their sum ``loss``):
  ITC against the momentum features of the global batch and the queue with momentum
  distillation, ``alpha`` (0.4) ramped linearly from 0 over ``alpha_warmup_epochs`` (BLIP's
  ``pretrain.py`` ramps over 2 epochs, its ``train_retrieval.py`` over 1); ITM with one hard
  negative text per image and image per text drawn from the similarities of the whole global
  batch; LM with label smoothing 0.1 over the caption tokens.
- **Distributed** (``medtune run --nproc_per_node N``; gloo on CPU, NCCL on CUDA): the model is
  wrapped in DDP; features are gathered across ranks (with gradient where the loss needs it), the
  hard negatives are drawn with a generator seeded by ``(seed, step)`` in dataset-index order, the
  LM loss is the mean over the global batch's tokens: N ranks x ``batch_size`` give the losses and
  update of one process with batch N x ``batch_size``.
- **Data**: ``dataset``: any reader of one-image caption samples (``medtune.data.caption_json`` for
  BLIP's ``[{image, caption}]`` files, ``medtune.data.subfigures.subfigure_json`` for PubMed
  figures split into subfigures by boxes); captions cleaned as BLIP's ``pre_caption``
  (``max_words`` 30) and padded to ``max_length`` (30) tokens; ``augment`` (opt-in, seeded per
  item).
- **Optimization**: AdamW (BLIP: lr 3e-4, weight decay 0.05), ``lr_scheduler``
  (``medtune.training.blip_schedules.blip_pretrain_lr``: warm-up from ``warmup_lr`` over
  ``warmup_steps`` in epoch 0, then ``lr_decay_rate ** epoch`` down to ``min_lr``),
  ``clip_grad_norm``, ``autocast`` (bf16 on CUDA), ``max_steps_per_epoch``.
- **Checkpoints**: ``output_dir/epoch_{k}/model.safetensors`` (every tensor once, momentum copies
  and queues included, BLIP's names) + ``config.yaml``; ``save_every_n_steps`` adds
  ``step_{n}/``; ``output_dir/recipe_state.pt`` (optimizer, scheduler, step, data position, every
  RNG). ``resume_from_checkpoint=True`` continues a killed run bit for bit.
- **Logging**: stdout and ``metric_logger`` (DiskLogger); curves in ``output_dir/plots/``.
- **Bad input** stops with one ``blip_pretrain: error:`` line naming the file, row or key.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torchtune import config

from medtune.models.blip.state import blip_state
from medtune.training import checkpointing as ckpt
from medtune.training.blip_data import BlipCollate, BlipPairs
from medtune.training.blip_state import load_blip_state
from medtune.training.data import build_dataloader
from medtune.training.trackers import build_metric_logger
from medtune.utils.config import cfg_get, check_keys, in_range, non_negative, positive
from medtune.utils.distributed import all_reduce_sum, barrier, init_process_group, resolve_device
from medtune.utils.errors import ConfigError, run_entry
from medtune.viz.curves import plot_run

SUPPORTS_DISTRIBUTED = True

KNOWN_KEYS = {
    "output_dir", "assets_dir", "towers_dir", "data_dir", "bert_dir", "vit_checkpoint", "init_from",
    "encoder", "model", "tokenizer", "dataset", "max_length", "max_words", "augment", "alpha",
    "alpha_warmup_epochs", "optimizer", "lr_scheduler", "metric_logger", "device", "autocast",
    "seed", "shuffle", "batch_size", "epochs", "max_steps_per_epoch", "clip_grad_norm",
    "num_workers", "log_every_n_steps", "save_every_n_steps", "resume_from_checkpoint",
}  # fmt: skip
LOSSES = ("loss", "loss_itc", "loss_itm", "loss_lm")


def step_generator(seed: int, step: int) -> torch.Generator:
    """The ITM draws of one step: the same on every rank and after a resume."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


class BlipPretrainRecipe:
    """BLIP pretraining (see the module docstring)."""

    name = "blip_pretrain"
    losses = LOSSES
    decoder = True

    def __init__(self, cfg: DictConfig) -> None:
        check_keys(cfg, KNOWN_KEYS, self.name)
        self.cfg = cfg
        self.device = resolve_device(cfg_get(cfg, "device", str, "auto"))
        self.distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
        self.rank, self.world_size = init_process_group(self.device) if self.distributed else (0, 1)
        self.is_rank_zero = self.rank == 0
        self.output_dir = Path(cfg_get(cfg, "output_dir", str))
        self.seed = cfg_get(cfg, "seed", int, 0)
        self.batch_size = cfg_get(cfg, "batch_size", int, check=positive())
        self.epochs = cfg_get(cfg, "epochs", int, check=positive())
        self.max_steps_per_epoch = cfg_get(cfg, "max_steps_per_epoch", int, None, check=positive())
        self.max_length = cfg_get(cfg, "max_length", int, 30, check=positive())
        self.max_words = cfg_get(cfg, "max_words", int, 30, check=positive())
        self.alpha = cfg_get(cfg, "alpha", float, 0.4, check=in_range(0.0, 1.0))
        self.alpha_warmup = cfg_get(cfg, "alpha_warmup_epochs", float, 2.0, check=non_negative())
        self.clip = cfg_get(cfg, "clip_grad_norm", float, None, check=positive())
        self.log_every = cfg_get(cfg, "log_every_n_steps", int, 1, check=positive())
        self.save_every = cfg_get(cfg, "save_every_n_steps", int, None, check=positive())
        self.num_workers = cfg_get(cfg, "num_workers", int, 0, check=non_negative())
        self.autocast = cfg_get(cfg, "autocast", bool, False) and self.device.type == "cuda"
        self.epoch, self.global_step, self.batches_done = 0, 0, 0
        self.loss_history: list[dict[str, float]] = []
        self._resume_rng = None
        torch.manual_seed(self.seed)  # the same on every rank: identical init and queues

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.cfg
        self.output_dir.mkdir(parents=True, exist_ok=True)
        state = None
        if cfg_get(cfg, "resume_from_checkpoint", bool, False):
            state = ckpt.load_recipe_state(self.output_dir)
        self.tokenizer = config.instantiate(cfg.tokenizer)
        self.encoder = config.instantiate(cfg.encoder)
        core = config.instantiate(cfg.model, vision=self.encoder, decoder=self.decoder)
        if (
            len(self.tokenizer) != core.config.vocab_size
            or self.tokenizer.enc_token_id != core.enc_token_id
            or self.tokenizer.bos_token_id != core.bos_token_id
        ):
            raise ConfigError(
                f"tokenizer: {len(self.tokenizer)} tokens but the model's text side has "
                f"{core.config.vocab_size}: tokenizer.path and model.bert_dir must name the same "
                "BERT folder"
            )
        init_from = cfg_get(cfg, "init_from", str, None)
        if state is not None:
            load_blip_state(core, self.output_dir / state["checkpoint"])
        elif init_from:
            from medtune.models.convert.blip import load_blip_init

            n = len(load_blip_init(core, init_from))
            if self.is_rank_zero:
                print(f"{self.name}: {n} tensors from {init_from}", flush=True)
        self.core = core.to(self.device)
        self.model = core
        if self.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            # the queues are written identically on every rank: no buffer broadcast needed
            self.model = DDP(core, device_ids=ids, broadcast_buffers=False)
        self._setup_data()
        global_batch = self.batch_size * self.world_size
        if core.queue_size % global_batch:
            raise ConfigError(
                f"model.queue_size: {core.queue_size} is not a multiple of the global batch "
                f"{global_batch} (batch_size x processes), as BLIP's queue needs"
            )
        params = [p for p in self.core.parameters() if p.requires_grad]
        self.optimizer = config.instantiate(cfg.optimizer, params)
        self.steps_per_epoch = self.n_batches
        self.scheduler = config.instantiate(
            cfg.lr_scheduler,
            self.optimizer,
            steps_per_epoch=self.steps_per_epoch,
            epochs=self.epochs,
        )
        # rank 0 only; the resolved config is logged once
        self.metric_logger = build_metric_logger(cfg, self.is_rank_zero)
        if state is not None:
            self._load_state(state)
        if self.is_rank_zero:
            n_train = sum(p.numel() for p in params)
            n_all = sum(p.numel() for p in self.core.parameters())
            print(
                f"{self.name}: {n_train:,} trained parameters ({n_all - n_train:,} momentum "
                f"copies); {len(self.train_set)} pairs, {self.steps_per_epoch} steps/epoch x "
                f"{self.epochs} epochs, global batch {global_batch} ({self.world_size} "
                f"process(es), device {self.device})",
                flush=True,
            )

    def _pairs(self, node, train: bool) -> BlipPairs:
        return BlipPairs(
            config.instantiate(node),
            self.encoder.transform,
            max_words=self.max_words,
            train=train,
            augment=OmegaConf.to_container(self.cfg.augment) if self.cfg.get("augment") else None,
            seed=self.seed,
        )

    def _setup_data(self) -> None:
        self.collate = BlipCollate(self.tokenizer, self.max_length)
        self.train_set = self._pairs(self.cfg.dataset, train=True)
        _, self.loader, self.sampler = build_dataloader(
            self.train_set,
            batch_size=self.batch_size,
            collate_fn=self.collate,
            shuffle=cfg_get(self.cfg, "shuffle", bool, True),
            seed=self.seed,
            rank=self.rank,
            world_size=self.world_size,
            num_workers=self.num_workers,
        )
        self.n_batches = len(self.loader)
        if self.max_steps_per_epoch is not None:
            self.n_batches = min(self.n_batches, self.max_steps_per_epoch)

    def _load_state(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.global_step = state["epoch"], state["global_step"]
        self.batches_done = state["batches_done"]
        self.loss_history = list(state["loss_history"])
        self._resume_rng = state["rng"]
        if self.is_rank_zero:
            print(
                f"resumed from {self.output_dir / state['checkpoint']} at epoch {self.epoch}, "
                f"step {self.global_step} ({self.batches_done} batches into the epoch)",
                flush=True,
            )

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, tag: str) -> None:
        """``output_dir/<tag>/`` (every model tensor once, config) and ``recipe_state.pt``."""
        if self.is_rank_zero:
            folder = self.output_dir / tag
            ckpt.save_trained(
                blip_state(self.core), folder, OmegaConf.to_yaml(self.cfg, resolve=True)
            )
            ckpt.save_recipe_state(
                self.output_dir,
                {
                    "checkpoint": tag,
                    "epoch": self.epoch,
                    "global_step": self.global_step,
                    "batches_done": self.batches_done,
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                    "rng": ckpt.rng_state(),
                    "seed": self.seed,
                    "loss_history": self.loss_history,
                },
            )
            print(f"saved {folder}", flush=True)
        barrier()

    # ------------------------------------------------------------------ train
    def alpha_at(self, epoch: int, i: int) -> float:
        """BLIP: ``alpha * min(1, (epoch * n + i) / (warmup_epochs * n))``."""
        if self.alpha_warmup == 0:
            return self.alpha
        n = self.n_batches
        return self.alpha * min(1.0, (epoch * n + i) / (self.alpha_warmup * n))

    def _losses(self, batch: dict, alpha: float, step: int) -> dict[str, torch.Tensor]:
        dev = self.device
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.autocast):
            return self.model(
                batch["images"].to(dev),
                batch["input_ids"].to(dev),
                batch["attention_mask"].to(dev),
                alpha=alpha,
                sample_keys=batch["index"].to(dev),
                idx=self._idx(batch),
                generator=step_generator(self.seed, step),
            )

    def _idx(self, batch: dict) -> torch.Tensor | None:
        return None  # pretraining: every pair is its own positive

    def _log(self, metrics: dict[str, float], dt: float, alpha: float) -> None:
        if not self.is_rank_zero or self.global_step % self.log_every:
            return
        lr = self.optimizer.param_groups[0]["lr"]
        metrics = {**metrics, "lr": lr, "alpha": alpha, "step_seconds": dt}
        if self.metric_logger is not None:
            self.metric_logger.log_dict(metrics, step=self.global_step)
        parts = " ".join(f"{k} {metrics[k]:.4f}" for k in self.losses)
        print(f"step {self.global_step} epoch {self.epoch} {parts} lr {lr:.2e}", flush=True)

    def train(self) -> None:
        """Epochs of steps; a checkpoint (and the curves) after each epoch."""
        self.model.train()
        params = [p for p in self.core.parameters() if p.requires_grad]
        while self.epoch < self.epochs:
            self.sampler.set_epoch(self.epoch, skip=self.batches_done)
            self.train_set.set_epoch(self.epoch)
            t0 = time.perf_counter()
            for batch in self.loader:
                if self.batches_done >= self.n_batches:
                    break
                if self._resume_rng is not None:  # restore just before the first resumed step
                    ckpt.set_rng_state(self._resume_rng)
                    self._resume_rng = None
                alpha = self.alpha_at(self.epoch, self.batches_done)
                out = self._losses(batch, alpha, self.global_step)
                out["loss"].backward()
                if self.clip is not None:
                    nn.utils.clip_grad_norm_(params, max_norm=self.clip)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.scheduler.step()
                self.global_step += 1
                self.batches_done += 1
                run = torch.stack([out[k].detach().float() for k in self.losses])
                mean = (all_reduce_sum(run) / self.world_size).tolist()
                metrics = dict(zip(self.losses, mean))
                self.loss_history.append(metrics)
                self._log(metrics, time.perf_counter() - t0, alpha)
                t0 = time.perf_counter()
                if (
                    self.save_every
                    and self.global_step % self.save_every == 0
                    and self.batches_done < self.n_batches
                ):
                    self.save_checkpoint(f"step_{self.global_step}")
            tag = f"epoch_{self.epoch}"
            self.epoch += 1
            self.batches_done = 0
            self.end_of_epoch(tag)
            self.save_checkpoint(tag)
            if self.is_rank_zero:
                plot_run(self.output_dir)  # output_dir/plots/*.png, redrawn each epoch

    def end_of_epoch(self, tag: str) -> None:
        """Pretraining has no evaluation (as BLIP's ``pretrain.py``)."""

    def cleanup(self) -> None:
        from medtune.utils.distributed import destroy

        if self.metric_logger is not None:
            self.metric_logger.close()
        destroy()


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    recipe = BlipPretrainRecipe(cfg)
    recipe.setup()
    recipe.train()
    recipe.cleanup()


if __name__ == "__main__":
    sys.exit(run_entry("blip_pretrain", recipe_main))
