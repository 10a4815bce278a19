"""BLIP image-text retrieval fine-tuning: ITC with image-id-aware positives, momentum distillation
and a queue, ITM with hard negatives from all ranks; evaluation as BLIP's: the ITC top ``k_test``
re-ranked by ITM (salesforce/BLIP ``train_retrieval.py``, ``models/blip_retrieval.py``).

    medtune run blip_retrieval --config demo
    medtune run blip_retrieval --config pubmed_brain data_dir=/data/pubmed_brain \\
        bert_dir=/models/bert-base-uncased init_from=/models/BLIP/model_base.pth
    medtune run --nproc_per_node 8 blip_retrieval --config pubmed_brain ...
    medtune score outputs/blip_retrieval_pubmed_brain/epoch_5/retrieval.safetensors

Features (all set in the config):

- **Model** (``model``: ``medtune.models.blip.blip_model`` with no decoder, as BLIP_Retrieval):
  the ``encoder`` ViT, the BERT with cross-attention from ``bert_dir``, projections, ITM head,
  momentum copies and queues (``queue_size`` a multiple of the global batch).
- **Start** (``init_from``): a released BLIP ``model_base.pth`` / ``model_base_retrieval_coco.pth``
  (key map :mod:`medtune.models.convert.blip`: refuses leftover and missing keys by name, drops
  the decoder, resizes ``pos_embed`` to the image size) or a ``blip_pretrain`` checkpoint folder.
- **Losses** (each logged: ``loss_itc``, ``loss_itm``, their sum ``loss``): ITC against the
  momentum features of the global batch and the queue, where every caption of the same image
  (``image_id``: same image file and crop) is a positive (BLIP's ``idx``-aware ``sim_targets``),
  with momentum distillation ``alpha`` (0.4) ramped from 0 over ``alpha_warmup_epochs`` (1, as
  BLIP); ITM with one hard negative per row drawn over the whole global batch (BLIP's
  ``negative_all_rank``), captions of the same image never negatives.
- **Evaluation** after each epoch on ``val_dataset`` (and ``test_dataset`` when set), BLIP's
  ``evaluation``: ITC cosine of every distinct image and caption, each row's top ``k_test``
  (256) re-scored as ITM match logit + ITC, the rest -100, both ways
  (:func:`medtune.eval.blip_retrieval.blip_retrieval_scores`); i2t / t2i R@1/5/10 and means by
  BLIP's ``itm_eval`` rules (:func:`medtune.eval.retrieval_metrics.itm_eval`), logged as
  ``val_*`` / ``test_*``; ``epoch_k/retrieval[_test].safetensors`` (``medtune score`` re-scores
  them). Under torchrun the re-ranked rows are split over ranks. The epoch of best ``val_r_mean``
  is printed (select on validation, never on test).
- **Data**: ``dataset`` etc. are any reader of one-image caption samples (``caption_json`` with
  several captions per image, ``subfigure_json``); BLIP's ``pre_caption`` (``max_words`` 30),
  ``max_length`` 35 tokens; ``augment`` (opt-in).
- **Distributed**, **optimization** (AdamW 1e-5 / wd 0.05; ``blip_cosine_lr``: cosine per epoch
  to ``min_lr`` 0 as BLIP), **checkpoints**, **resume**, **logging** and **bad input** as
  ``blip_pretrain``.
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
from medtune.utils.config import (
    cfg_get,
    check_keys,
    in_range,
    non_negative,
    optional_component,
    positive,
)
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
    "val_dataset", "test_dataset", "k_test", "eval_batch_size",
}  # fmt: skip
LOSSES = ("loss", "loss_itc", "loss_itm")


def step_generator(seed: int, step: int) -> torch.Generator:
    """The ITM draws of one step: the same on every rank and after a resume."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


class BlipRetrievalRecipe:
    """BLIP retrieval fine-tuning (see the module docstring)."""

    name = "blip_retrieval"
    losses = LOSSES
    decoder = False

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
        self.max_length = cfg_get(cfg, "max_length", int, 35, check=positive())
        self.max_words = cfg_get(cfg, "max_words", int, 30, check=positive())
        self.alpha = cfg_get(cfg, "alpha", float, 0.4, check=in_range(0.0, 1.0))
        self.alpha_warmup = cfg_get(cfg, "alpha_warmup_epochs", float, 1.0, check=non_negative())
        self.k_test = cfg_get(cfg, "k_test", int, 256, check=positive())
        self.eval_batch_size = cfg_get(cfg, "eval_batch_size", int, 64, check=positive())
        self.best: tuple[float, str] | None = None
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
        return batch["image_id"].to(self.device)  # captions of one image are positives

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
        """BLIP's evaluation on the validation (and test) split after each epoch."""
        metrics = {}
        for split, key in (("val", "val_dataset"), ("test", "test_dataset")):
            node = optional_component(self.cfg, key)
            if node is not None:
                metrics.update(self.evaluate(node, split, tag))
        if self.is_rank_zero and metrics:
            if self.metric_logger is not None:
                self.metric_logger.log_dict(metrics, step=self.global_step)
            if "val_r_mean" in metrics and (
                self.best is None or metrics["val_r_mean"] > self.best[0]
            ):
                self.best = (metrics["val_r_mean"], tag)
            if self.best is not None:
                print(f"best val_r_mean {self.best[0]:.2f} at {self.best[1]}", flush=True)

    @torch.no_grad()
    def evaluate(self, node, split: str, tag: str) -> dict[str, float]:
        """Re-ranked retrieval scores of one split; writes ``<tag>/retrieval[_test].safetensors``."""
        from medtune.eval.blip_retrieval import blip_retrieval_scores
        from medtune.eval.retrieval_metrics import itm_eval, save_retrieval
        from medtune.training.blip_data import ImagesOf

        pairs = self._pairs(node, train=False)
        rows, txt2img, img2txt = pairs.retrieval_index()
        tok = self.tokenizer(
            pairs.captions,
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        loader = torch.utils.data.DataLoader(
            ImagesOf(pairs, rows), batch_size=self.eval_batch_size, num_workers=self.num_workers
        )
        self.core.eval()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            out = blip_retrieval_scores(
                self.core,
                loader,
                tok["input_ids"],
                tok["attention_mask"],
                k_test=self.k_test,
                device=self.device,
                rank=self.rank,
                world=self.world_size,
            )
        self.model.train()
        result = itm_eval(out["sim_i2t"], out["sim_t2i"], torch.tensor(txt2img), img2txt)
        metrics = {f"{split}_{k}": v for k, v in result.items()}
        if self.is_rank_zero:
            name = "retrieval.safetensors" if split == "val" else f"retrieval_{split}.safetensors"
            save_retrieval(
                self.output_dir / tag / name,
                out["sim_i2t"],
                txt2img,
                out["sim_t2i"],
                metadata={"rule": f"itm_logit_plus_itc_top{self.k_test}_else_-100", "split": split},
            )
            print(
                f"{tag} {split}: " + " ".join(f"{k} {v:.2f}" for k, v in result.items()),
                flush=True,
            )
        return metrics

    def cleanup(self) -> None:
        from medtune.utils.distributed import destroy

        if self.metric_logger is not None:
            self.metric_logger.close()
        destroy()


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    recipe = BlipRetrievalRecipe(cfg)
    recipe.setup()
    recipe.train()
    recipe.cleanup()


if __name__ == "__main__":
    sys.exit(run_entry("blip_retrieval", recipe_main))
