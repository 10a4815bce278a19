"""BLIP-2 stage 1: train a Q-Former on a frozen image encoder with ITC + ITM + ITG.

    medtune run qformer_pretrain --config demo
    medtune run qformer_pretrain --config roco_biomedclip encoder_dir=... bert_dir=... data_dir=...
    medtune run --nproc_per_node 8 qformer_pretrain --config roco_sam ...
    medtune run vision_finetune --config roco_msmedcap      # stage 2 from both stage-1 runs

Features (all set in the config):

- **Encoder** (``encoder``): any ``_component_`` returning a medtune vision encoder
  (``medtune.models.encoders.biomedclip_vision``, ``open_clip_vision``, ``timm_vision`` for SAM);
  it stays frozen (eval mode, no gradient), as in BLIP-2. Its image transform is used.
- **Q-Former** (``model``): ``medtune.models.blip2.qformer.blip2_qformer``: a BERT-style
  Q-Former initialised from a local HF BERT folder (``bert_dir``; bert-base-uncased for BLIP-2),
  cross-attention every ``cross_attention_freq`` layers, ``num_query_tokens`` queries, 256-d
  ITC projections, ITM head, temperature 0.07. ``tokenizer`` is that folder's BERT tokenizer with
  ``[DEC]`` added; captions are cut/padded to ``max_txt_len`` (32) tokens. ``init_from: {kind:
  lavis_blip2, path: blip2_pretrained.pth}`` starts it from LAVIS's released stage-1 weights
  (MSMedCap does; ``vision_side: skip`` for an encoder of another width than EVA ViT-g's 1,408).
- **Losses**: ITC (max over queries, label smoothing 0.1), ITM (hard negatives from the softmaxed
  similarities, positives excluded), ITG (captioning conditioned on the queries), summed; each is
  logged (``loss_itc``, ``loss_itm``, ``loss_itg``).
- **Distributed** (``medtune run --nproc_per_node N``; gloo on CPU, NCCL on CUDA): the Q-Former is
  wrapped in DDP; ITC features are gathered across ranks with gradient (N x B candidates); the
  hard negatives are drawn over the whole global batch with a generator seeded by
  ``(seed, step)`` in dataset-index order, and ITG is the mean over the global batch's tokens, so
  N ranks x ``batch_size`` give the loss and update of one process with batch N x ``batch_size``.
- **Optimization**: ``optimizer`` (AdamW, LAVIS: lr 1e-4, weight decay 0.05), ``lr_scheduler``
  (torchtune's cosine with warm-up), ``gradient_accumulation_steps``, ``clip_grad_norm``,
  ``autocast`` (bf16 on CUDA; the Q-Former keeps fp32 weights), ``max_steps_per_epoch``.
- **Validation**: after each epoch, the losses on ``val_dataset`` and image-to-text /
  text-to-image recall at 1/5/10 from the ITC scores (BLIP's ``itm_eval`` keys, computed by
  :func:`medtune.eval.retrieval_metrics.itm_eval`); ``epoch_k/retrieval.safetensors`` holds the
  scores (``medtune score`` re-scores it).
- **Curves**: ``output_dir/plots/*.png`` (losses, lr, validation recall; from the DiskLogger log),
  redrawn after each epoch by :func:`medtune.viz.curves.plot_run`.
- **Checkpoints**: ``output_dir/epoch_{k}/model.safetensors`` (the Q-Former, every tensor),
  ``qformer.json`` (its sizes), ``config.yaml``; ``save_every_n_steps`` adds ``step_{n}/``;
  ``output_dir/recipe_state.pt`` (optimizer, scheduler, step, data position, every RNG).
  ``resume_from_checkpoint=True`` continues a killed run and reproduces the uninterrupted one.
- **Stage 2**: ``vision_finetune`` with a ``blip2_qformer`` connector and ``init_from: {encoder:
  output_dir/epoch_k, ...}``: one stage-1 run per encoder, merged by configuration.
- **Bad input** stops with one ``qformer_pretrain: error:`` line naming the file, row or key.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torchtune import config

from medtune.data.image_text import ImageTextDataset
from medtune.training import checkpointing as ckpt
from medtune.training.data import build_dataloader
from medtune.training.stage1 import CaptionCollate, IndexedPairs, save_sizes
from medtune.training.trackers import build_metric_logger
from medtune.utils.config import cfg_get, check_keys, non_negative, optional_component, positive
from medtune.utils.distributed import all_reduce_sum, barrier, init_process_group, resolve_device
from medtune.utils.errors import ConfigError, run_entry
from medtune.viz.curves import plot_run

SUPPORTS_DISTRIBUTED = True

KNOWN_KEYS = {
    "output_dir", "assets_dir", "towers_dir", "data_dir", "encoder_dir", "bert_dir", "sam_checkpoint",
    "encoder",
    "model", "tokenizer", "dataset", "val_dataset", "max_txt_len", "optimizer", "lr_scheduler",
    "metric_logger", "device", "autocast", "seed", "shuffle", "batch_size", "epochs",
    "max_steps_per_epoch", "gradient_accumulation_steps", "clip_grad_norm", "num_workers",
    "log_every_n_steps", "save_every_n_steps", "resume_from_checkpoint", "init_from",
}  # fmt: skip
LOSSES = ("loss", "loss_itc", "loss_itm", "loss_itg")


def _step_generator(seed: int, step: int, micro: int) -> torch.Generator:
    """The ITM draws of one micro-batch: the same on every rank and after a resume."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 101 + micro)


class QFormerPretrainRecipe:
    """BLIP-2 stage 1 (see the module docstring): ``setup``, ``train``, ``save_checkpoint``, ``cleanup``."""

    name = "qformer_pretrain"

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
        self.accum = cfg_get(cfg, "gradient_accumulation_steps", int, 1, check=positive())
        self.max_steps_per_epoch = cfg_get(cfg, "max_steps_per_epoch", int, None, check=positive())
        self.max_txt_len = cfg_get(cfg, "max_txt_len", int, 32, check=positive())
        self.clip = cfg_get(cfg, "clip_grad_norm", float, None, check=positive())
        self.log_every = cfg_get(cfg, "log_every_n_steps", int, 1, check=positive())
        self.save_every = cfg_get(cfg, "save_every_n_steps", int, None, check=positive())
        self.num_workers = cfg_get(cfg, "num_workers", int, 0, check=non_negative())
        self.autocast = cfg_get(cfg, "autocast", bool, False) and self.device.type == "cuda"
        self.epoch, self.global_step, self.batches_done = 0, 0, 0
        self.loss_history: list[dict[str, float]] = []
        self._resume_rng = None
        torch.manual_seed(self.seed)  # the same on every rank: identical Q-Former init

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.cfg
        self.output_dir.mkdir(parents=True, exist_ok=True)
        state = None
        if cfg_get(cfg, "resume_from_checkpoint", bool, False):
            state = ckpt.load_recipe_state(self.output_dir)
        self.tokenizer = config.instantiate(cfg.tokenizer)
        with self.device:
            self.encoder = config.instantiate(cfg.encoder)
        self.encoder.eval().requires_grad_(False)
        with self.device:
            core = config.instantiate(cfg.model, vision_width=self.encoder.out_dim)
        dec = self.tokenizer.convert_tokens_to_ids("[DEC]")
        if dec != core.bos_token_id or len(self.tokenizer) != core.config.vocab_size:
            raise ConfigError(
                f"tokenizer: {len(self.tokenizer)} tokens ([DEC] = {dec}) but the Q-Former has "
                f"{core.config.vocab_size} ([DEC] = {core.bos_token_id}): tokenizer.path and "
                "model.bert_dir must name the same BERT folder"
            )
        if state is not None:
            ckpt.load_trained(core, self.output_dir / state["checkpoint"])
        elif cfg.get("init_from"):  # e.g. {kind: lavis_blip2, path: blip2_pretrained.pth}
            from medtune.models.convert.init import foreign_state_dict

            spec = OmegaConf.to_container(cfg.init_from, resolve=True)
            core.load_state_dict(foreign_state_dict(core, spec), strict=False)
        self.core = core.float()
        self.model = core
        if self.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DDP(core, device_ids=ids)
        self._setup_data()
        self.optimizer = config.instantiate(cfg.optimizer, self.core.parameters())
        self.steps_per_epoch = max(1, self.n_batches // self.accum)
        total = self.steps_per_epoch * self.epochs
        self.scheduler = config.instantiate(
            cfg.lr_scheduler, self.optimizer, num_training_steps=total
        )
        # rank 0 only; logs the resolved config once
        self.metric_logger = build_metric_logger(cfg, self.is_rank_zero)
        if state is not None:
            self._load_state(state)
        if self.is_rank_zero:
            n_enc = sum(p.numel() for p in self.encoder.parameters())
            n_q = sum(p.numel() for p in self.core.parameters())
            print(
                f"{self.name}: encoder {n_enc:,} parameters (frozen), Q-Former {n_q:,} (trained); "
                f"{len(self.train_set)} pairs, {self.steps_per_epoch} steps/epoch x {self.epochs} "
                f"epochs, global batch {self.batch_size * self.world_size * self.accum} "
                f"({self.world_size} process(es), device {self.device})",
                flush=True,
            )

    def _pairs(self, node) -> IndexedPairs:
        samples = config.instantiate(node)
        return IndexedPairs(ImageTextDataset(samples, self.encoder.transform, train=False))

    def _setup_data(self) -> None:
        cfg = self.cfg
        collate = CaptionCollate(self.tokenizer, self.max_txt_len)
        self.train_set = self._pairs(cfg.dataset)
        _, self.loader, self.sampler = build_dataloader(
            self.train_set,
            batch_size=self.batch_size,
            collate_fn=collate,
            shuffle=cfg_get(cfg, "shuffle", bool, True),
            seed=self.seed,
            rank=self.rank,
            world_size=self.world_size,
            num_workers=self.num_workers,
        )
        self.n_batches = len(self.loader)
        if self.max_steps_per_epoch is not None:
            self.n_batches = min(self.n_batches, self.max_steps_per_epoch * self.accum)
        val = optional_component(cfg, "val_dataset")  # val_dataset=null switches it off
        self.val_loader = None
        if val is not None:
            self.val_set = self._pairs(val)
            _, self.val_loader, _ = build_dataloader(
                self.val_set,
                batch_size=self.batch_size,
                collate_fn=collate,
                shuffle=False,
                seed=self.seed,
                rank=self.rank,
                world_size=self.world_size,
                num_workers=self.num_workers,
            )

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
        """``output_dir/<tag>/`` (Q-Former weights, sizes, config) and ``recipe_state.pt``."""
        if self.is_rank_zero:
            folder = self.output_dir / tag
            sd = {k: v.detach().cpu().contiguous() for k, v in self.core.state_dict().items()}
            ckpt.save_trained(sd, folder, OmegaConf.to_yaml(self.cfg, resolve=True))
            save_sizes(self.core, folder)
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
    def _losses(self, batch: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
        images = batch["images"].to(self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            with torch.no_grad():
                feats = self.encoder(images)  # [b, n, width], frozen
            return self.model(
                feats,
                batch["input_ids"].to(self.device),
                batch["attention_mask"].to(self.device),
                generator=generator,
                sample_keys=batch["index"].to(self.device),
            )

    def _log(self, metrics: dict[str, float], dt: float) -> None:
        if not self.is_rank_zero or self.global_step % self.log_every:
            return
        metrics = {
            **metrics,
            "lr": self.optimizer.param_groups[0]["lr"],
            "step_seconds": dt,
            "images_per_second": self.batch_size * self.accum * self.world_size / dt,
        }
        if self.metric_logger is not None:
            self.metric_logger.log_dict(metrics, step=self.global_step)
        parts = " ".join(f"{k} {metrics[k]:.4f}" for k in LOSSES)
        print(
            f"step {self.global_step} epoch {self.epoch} {parts} lr {metrics['lr']:.2e}", flush=True
        )

    def train(self) -> None:
        """Epochs of (accumulated) steps; validation and a checkpoint after each epoch."""
        self.model.train()
        self.encoder.eval()
        params = [p for p in self.core.parameters() if p.requires_grad]
        while self.epoch < self.epochs:
            self.sampler.set_epoch(self.epoch, skip=self.batches_done)
            self.train_set.set_epoch(self.epoch)
            run = torch.zeros(len(LOSSES), device=self.device)
            t0 = time.perf_counter()
            for batch in self.loader:
                if self.batches_done >= self.n_batches:
                    break
                if self._resume_rng is not None:  # restore just before the first resumed step
                    ckpt.set_rng_state(self._resume_rng)
                    self._resume_rng = None
                micro = self.batches_done % self.accum
                last = micro == self.accum - 1
                sync = (
                    self.model.no_sync()
                    if self.distributed and not last
                    else contextlib.nullcontext()
                )
                with sync:
                    out = self._losses(batch, _step_generator(self.seed, self.global_step, micro))
                    (out["loss"] / self.accum).backward()
                run += torch.stack([out[k].detach() for k in LOSSES]) / self.accum
                self.batches_done += 1
                if not last:
                    continue
                if self.clip is not None:
                    nn.utils.clip_grad_norm_(params, max_norm=self.clip)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.scheduler.step()
                self.global_step += 1
                mean = (all_reduce_sum(run.clone()) / self.world_size).tolist()
                metrics = dict(zip(LOSSES, mean))
                self.loss_history.append(metrics)
                self._log(metrics, time.perf_counter() - t0)
                run.zero_()
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
            if self.val_loader is not None:
                self.validate(tag)
            self.save_checkpoint(tag)
            if self.is_rank_zero:
                plot_run(self.output_dir)  # output_dir/plots/*.png, redrawn each epoch

    @torch.no_grad()
    def validate(self, tag: str) -> dict[str, float]:
        """Validation losses and ITC retrieval recall; writes ``<tag>/retrieval.safetensors``."""
        from medtune.eval.retrieval_metrics import itm_eval, save_retrieval
        from medtune.utils.distributed import gather

        self.model.eval()
        n = len(self.val_set)
        core, tot, k = self.core, torch.zeros(len(LOSSES), device=self.device), 0
        img_rows, txt_rows, idx_rows = [], [], []
        for i, batch in enumerate(self.val_loader):
            out = self._losses(batch, _step_generator(self.seed, -1, i))
            tot += torch.stack([out[key] for key in LOSSES])
            k += 1
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                feats = self.encoder(batch["images"].to(self.device))
                img = core.image_feats(core.encode_image(feats)[0])
                txt = core.text_feat(
                    core.encode_text(
                        batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
                    )
                )
            img_rows.append(gather(img.float(), False))
            txt_rows.append(gather(txt.float(), False))
            idx_rows.append(gather(batch["index"].to(self.device), False))
        self.model.train()
        self.encoder.eval()
        losses = (all_reduce_sum(tot) / (self.world_size * max(k, 1))).tolist()
        # the sampler pads the last batches by repeating samples: keep one row per dataset index
        idx = torch.cat(idx_rows).cpu()
        img_all, txt_all = torch.cat(img_rows).cpu(), torch.cat(txt_rows).cpu()
        img_feats = torch.empty(n, *img_all.shape[1:])
        txt_feats = torch.empty(n, txt_all.shape[1])
        img_feats[idx], txt_feats[idx] = img_all, txt_all
        sim = core.similarity(img_feats, txt_feats)  # [n, n]: sample i's image and caption
        metrics = {f"val_{key}": v for key, v in zip(LOSSES, losses)}
        metrics.update({f"val_{key}": v for key, v in itm_eval(sim, None, torch.arange(n)).items()})
        if self.is_rank_zero:
            save_retrieval(self.output_dir / tag / "retrieval.safetensors", sim, torch.arange(n))
            if self.metric_logger is not None:
                self.metric_logger.log_dict(metrics, step=self.global_step)
            print(
                f"{tag} validation: "
                + " ".join(f"{key.removeprefix('val_')} {v:.4f}" for key, v in metrics.items()),
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
    recipe = QFormerPretrainRecipe(cfg)
    recipe.setup()
    recipe.train()
    recipe.cleanup()


if __name__ == "__main__":
    sys.exit(run_entry("qformer_pretrain", recipe_main))
