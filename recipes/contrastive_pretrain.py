"""Contrastive image-text pretraining of a dual encoder (CLIP; BLIP / ALBEF ITM and momentum queue).

    medtune run contrastive_pretrain --config demo
    medtune run contrastive_pretrain --config caption_json data_dir=/data/brain_vlp
    medtune run contrastive_pretrain --config roco_biomedclip model.path=/models/BiomedCLIP-... \\
        model.text_model_dir=/models/BiomedBERT data_dir=/data/roco-dataset
    medtune run --nproc_per_node 8 contrastive_pretrain --config roco_biomedclip ...
    medtune score outputs/contrastive_pretrain_demo/epoch_1/retrieval.safetensors

Features (all set in the config):

- **Model** (``model``): any ``_component_`` returning a :class:`medtune.models.dual_encoder.
  DualEncoder`: ``open_clip_dual_encoder`` (both towers of any open_clip hub folder, BiomedCLIP's
  PubMedBERT included, built from a local HF folder ``text_model_dir``; never downloads) or
  ``dual_encoder_from_towers`` (towers named by an open_clip ``model_cfg``). ``model.itm: true``
  adds an image-text matching head. ``tokenizer`` is built from the model
  (``medtune.models.dual_encoder.tokenizer_for``).
- **Trainable parts**: ``trainable.image`` / ``trainable.text``: ``full | frozen`` (the
  temperature trains unless both are frozen). A table of parameter counts is printed.
- **Loss** (``loss``): symmetric InfoNCE with the learnable temperature (open_clip ``ClipLoss``).
  Under torchrun the features are gathered across ranks with gradient (``gather_with_grad``), so
  N ranks x ``batch_size`` B see N*B negatives, and the loss and update equal one process with
  batch N*B; ``local_loss`` scores each rank's rows only (less memory, same gradient).
  ``loss.itm_weight > 0``: BLIP's ITM with hard negatives drawn from the global batch.
  ``momentum_queue.queue_size > 0``: ALBEF / BLIP ITC against a momentum encoder's feature queue
  with momentum distillation (``momentum``, ``alpha``) instead of the gathered in-batch loss.
- **Data**: ``dataset`` / ``val_dataset`` are any medtune reader whose samples hold one image and a
  caption (``medtune.data.caption_json`` for ``[{image, caption}]``, ``medtune.data.roco``, report
  readers); ``augment`` (opt-in, seeded per item so workers and resume do not change it).
- **Optimization**: ``optimizer`` (AdamW; no weight decay on gains, biases and the temperature, as
  open_clip), ``lr_scheduler`` (torchtune's cosine with warm-up), ``clip_grad_norm``,
  ``autocast`` (bf16 on CUDA), ``max_steps_per_epoch``, ``max_steps`` (stop early; the schedule
  still spans all ``epochs``).
- **Validation = retrieval**: after each epoch the ``val_dataset``'s unique images and captions are
  embedded and ``epoch_k/retrieval.safetensors`` is written (``sim_i2t``, ``txt2img``; with an ITM
  head the ITC top ``retrieval.k_test`` candidates are re-scored by ITM + ITC as BLIP's
  ``train_retrieval.py`` does, others -100, adding ``sim_t2i``); BLIP's ``itm_eval`` numbers are
  logged and printed (``medtune score`` re-scores the file).
- **Checkpoints**: ``output_dir/epoch_{k}/model.safetensors`` (all weights, DualEncoder names) +
  ``config.yaml`` + ``open_clip/`` (hub layout: ``open_clip_config.json`` + weights + tokenizer
  files, loadable by ``open_clip.create_model_and_transforms('local-dir:...')`` and as a MedVLM
  encoder by ``medtune.models.encoders.open_clip_vision``), and ``output_dir/recipe_state.pt``
  (optimizer, scheduler, step, data position, momentum queue, every RNG). ``save_every_n_steps``
  adds ``step_{n}/``. ``resume_from_checkpoint=True`` continues and reproduces the uninterrupted run.
- **Logging**: stdout and ``metric_logger`` (torchtune's DiskLogger by default); curves in
  ``output_dir/plots/*.png`` redrawn after each epoch (:func:`medtune.viz.curves.plot_run`).
- **Bad input** stops with one ``contrastive_pretrain: error:`` line naming the file, row or key.
- **Distributed**: ``medtune run --nproc_per_node N``: gloo on CPU, NCCL on CUDA; the towers (and
  the ITM head) are wrapped in DDP; every rank holds identical weights.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torchtune import config

from medtune.data.image_text import ImageTextDataset, collate_image_text
from medtune.eval.retrieval_scores import retrieval_scores
from medtune.training import checkpointing as ckpt
from medtune.training.contrastive import MomentumQueue
from medtune.training.data import build_dataloader
from medtune.training.trackers import build_metric_logger
from medtune.utils.config import (
    cfg_get,
    check_keys,
    non_negative,
    one_of,
    optional_component,
    positive,
)
from medtune.utils.distributed import all_reduce_sum, barrier, init_process_group, resolve_device
from medtune.utils.errors import ConfigError, UserError, run_entry
from medtune.viz.curves import plot_run

SUPPORTS_DISTRIBUTED = True

KNOWN_KEYS = {
    "output_dir", "assets_dir", "data_dir", "model", "tokenizer", "dataset", "val_dataset", "loss",
    "momentum_queue", "optimizer", "lr_scheduler", "metric_logger", "trainable", "device", "seed",
    "batch_size", "epochs", "max_steps_per_epoch", "max_steps", "clip_grad_norm", "autocast",
    "num_workers", "augment", "retrieval", "export_open_clip", "export_text_model_name",
    "log_every_n_steps", "save_every_n_steps", "resume_from_checkpoint",
}  # fmt: skip


class ContrastivePretrainRecipe:
    """Dual-encoder pretraining; see the module docstring."""

    name = "contrastive_pretrain"

    def __init__(self, cfg: DictConfig) -> None:
        check_keys(cfg, KNOWN_KEYS, self.name)
        self.cfg = cfg
        self.output_dir = Path(cfg_get(cfg, "output_dir", str))
        self.device = resolve_device(cfg_get(cfg, "device", str, "auto"))
        self.seed = cfg_get(cfg, "seed", int, 0)
        self.batch_size = cfg_get(cfg, "batch_size", int, check=positive())
        self.epochs = cfg_get(cfg, "epochs", int, check=positive())
        self.max_steps_per_epoch = cfg_get(cfg, "max_steps_per_epoch", int, None, check=positive())
        self.max_steps = cfg_get(cfg, "max_steps", int, None, check=positive())
        self.clip_grad_norm = cfg_get(cfg, "clip_grad_norm", float, None, check=positive())
        self.log_every = cfg_get(cfg, "log_every_n_steps", int, 10, check=positive())
        self.save_every = cfg_get(cfg, "save_every_n_steps", int, None, check=positive())
        self.autocast = cfg_get(cfg, "autocast", bool, False) and self.device.type == "cuda"
        self.num_workers = cfg_get(cfg, "num_workers", int, 0, check=non_negative())
        self.k_test = cfg_get(cfg, "retrieval.k_test", int, 128, check=positive())
        self.resume = cfg_get(cfg, "resume_from_checkpoint", bool, False)
        for part in ("image", "text"):
            cfg_get(cfg, f"trainable.{part}", str, "full", check=one_of("full", "frozen"))
        self.global_step = 0
        self.epoch = 0
        self.batches_done = 0  # in the current epoch

    # ----------------------------------------------------------------------------- setup
    def setup(self) -> None:
        cfg = self.cfg
        self.rank, self.world = init_process_group(self.device)
        self.distributed = self.world > 1
        torch.manual_seed(self.seed)
        model = config.instantiate(cfg.model)
        if not hasattr(model, "encode_image") or not hasattr(model, "text_tower"):
            raise ConfigError("model: expected a medtune.models.dual_encoder.DualEncoder builder")
        self.tokenizer = config.instantiate(cfg.tokenizer, model)
        self._set_trainable(model)
        model.to(self.device)
        self.model = model
        self.loss_fn = config.instantiate(cfg.loss)
        if getattr(self.loss_fn, "itm_weight", 0) > 0 and model.itm is None:
            raise ConfigError("loss.itm_weight > 0 needs an ITM head: set model.itm=true")
        qsize = cfg_get(cfg, "momentum_queue.queue_size", int, 0, check=non_negative())
        self.queue = None
        if qsize:
            self.queue = MomentumQueue(
                model,
                qsize,
                momentum=cfg_get(cfg, "momentum_queue.momentum", float, 0.995),
                alpha=cfg_get(cfg, "momentum_queue.alpha", float, 0.4),
            ).to(self.device)
        self.train_model, self.itm_head = self._wrap(model)
        decay, no_decay = [], []
        for n, p in model.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim < 2 or "logit_scale" in n else decay).append(p)
        self.optimizer = config.instantiate(
            cfg.optimizer, [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
        )

        augment = cfg.get("augment")
        augment = OmegaConf.to_container(augment, resolve=True) if augment else None
        self.train_set = ImageTextDataset(
            config.instantiate(cfg.dataset),
            model.transform,
            train=True,
            augment=augment,
            seed=self.seed,
        )
        val = optional_component(cfg, "val_dataset")  # val_dataset=null switches it off
        self.val_samples = config.instantiate(val) if val is not None else None
        collate = collate_image_text(self.tokenizer)
        _, self.loader, self.sampler = build_dataloader(
            self.train_set,
            batch_size=self.batch_size,
            collate_fn=collate,
            shuffle=True,
            seed=self.seed,
            rank=self.rank,
            world_size=self.world,
            num_workers=self.num_workers,
        )
        self.steps_per_epoch = len(self.loader)
        if self.max_steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, self.max_steps_per_epoch)
        total = self.steps_per_epoch * self.epochs
        self.lr_scheduler = config.instantiate(
            cfg.lr_scheduler, self.optimizer, num_training_steps=total
        )
        # rank 0 only; logs the resolved config once
        self.logger = build_metric_logger(cfg, self.rank == 0)
        self._resume_rng = None
        if self.resume:
            self._load_state()
        self._print_params()

    def _set_trainable(self, model: nn.Module) -> None:
        parts = {"image": model.clip.visual, "text": getattr(model.clip, "text", None)}
        if parts["text"] is None:  # native CLIP: the text tower is the rest of the model
            parts["text"] = nn.ModuleList(
                [m for n, m in model.clip.named_children() if n != "visual"]
            )
        frozen = [p for p in ("image", "text") if self.cfg.get("trainable", {}).get(p) == "frozen"]
        for p in frozen:
            for param in parts[p].parameters():
                param.requires_grad_(False)
        if len(frozen) == 2:
            model.clip.logit_scale.requires_grad_(False)

    def _wrap(self, model: nn.Module):
        if not self.distributed:
            return model, model.itm
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.device.index] if self.device.type == "cuda" else None
        # the ITM head runs after the features are gathered: its own DDP, outside the towers'
        ignore = [f"itm.{n}" for n, _ in model.itm.named_parameters()] if model.itm else []
        DDP._set_params_and_buffers_to_ignore_for_model(model, ignore)
        towers = DDP(model, device_ids=ids)
        head = DDP(model.itm, device_ids=ids) if model.itm is not None else None
        return towers, head

    def _print_params(self) -> None:
        if self.rank != 0:
            return
        rows = {"image": self.model.clip.visual, "itm": self.model.itm}
        total = sum(p.numel() for p in self.model.parameters())
        print(f"{'part':<8}{'params':>12}{'trainable':>12}")
        for name, mod in rows.items():
            if mod is not None:
                n = sum(p.numel() for p in mod.parameters())
                t = sum(p.numel() for p in mod.parameters() if p.requires_grad)
                print(f"{name:<8}{n:>12,}{t:>12,}")
        other = total - sum(
            sum(p.numel() for p in m.parameters()) for m in rows.values() if m is not None
        )
        t_other = sum(p.numel() for p in self.model.parameters() if p.requires_grad) - sum(
            sum(p.numel() for p in m.parameters() if p.requires_grad)
            for m in rows.values()
            if m is not None
        )
        print(f"{'text':<8}{other:>12,}{t_other:>12,}")

    # ----------------------------------------------------------------------------- state
    def _load_state(self) -> None:
        state = ckpt.load_recipe_state(self.output_dir)
        sd = ckpt.read_trained(self.output_dir / state["checkpoint"], "resume_from_checkpoint")
        missing, unexpected = self.model.load_state_dict(sd, strict=False)
        if unexpected or [k for k in missing if not k.startswith("itm.")]:
            raise UserError(
                f"{self.output_dir / state['checkpoint']}: weights do not match the model "
                f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        if self.queue is not None and "queue" in state:
            self.queue.load_state_dict(state["queue"])
        self.global_step, self.epoch, self.batches_done = (
            state["step"],
            state["epoch"],
            state["batches_done"],
        )
        self._resume_rng = state["rng"]

    def save_checkpoint(self, name: str) -> None:
        """``output_dir/<name>/`` (weights, config, open_clip export) and ``recipe_state.pt``."""
        folder = self.output_dir / name
        if self.rank == 0:
            sd = {k: v.detach().to("cpu").contiguous() for k, v in self.model.state_dict().items()}
            ckpt.save_trained(sd, folder, OmegaConf.to_yaml(self.cfg, resolve=True))
            if cfg_get(self.cfg, "export_open_clip", bool, True):
                from medtune.models.dual_encoder import export_open_clip

                export_open_clip(
                    self.model,
                    folder / "open_clip",
                    text_model_name=cfg_get(self.cfg, "export_text_model_name", str, None),
                )
            state = {
                "checkpoint": name,
                "step": self.global_step,
                "epoch": self.epoch,
                "batches_done": self.batches_done,
                "optimizer": self.optimizer.state_dict(),
                "lr_scheduler": self.lr_scheduler.state_dict(),
                "rng": ckpt.rng_state(),
            }
            if self.queue is not None:
                state["queue"] = self.queue.state_dict()
            ckpt.save_recipe_state(self.output_dir, state)
        barrier()

    # ----------------------------------------------------------------------------- train
    def _step(
        self, images: torch.Tensor, tokens: torch.Tensor, ids: torch.Tensor
    ) -> dict[str, float]:
        images, tokens = images.to(self.device), tokens.to(self.device)
        want_tokens = getattr(self.loss_fn, "itm_weight", 0) > 0
        ctx = (
            torch.autocast("cuda", torch.bfloat16)
            if self.autocast
            else torch.autocast("cpu", enabled=False)
        )
        with ctx:
            out = self.train_model(images, tokens, with_tokens=want_tokens)
            if self.queue is not None:
                res = {"itc": self.queue.loss(self.model, out, images, tokens)}
                res["loss"] = res["itc"]
                if want_tokens:
                    res["itm"], res["itm_acc"] = self.loss_fn.itm(
                        self.itm_head, out, self.global_step, ids
                    )
                    res["loss"] = res["loss"] + self.loss_fn.itm_weight * res["itm"]
            else:
                res = self.loss_fn(out, self.itm_head, step=self.global_step, ids=ids)
        self.optimizer.zero_grad(set_to_none=True)
        res["loss"].backward()
        if self.clip_grad_norm:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        with torch.no_grad():
            self.model.clip.logit_scale.clamp_(0, math.log(100))  # open_clip's clamp
        # this rank's values -> the mean over ranks
        vals = torch.stack([v.detach().float() for v in res.values()]).cpu()
        vals = all_reduce_sum(vals) / self.world
        return dict(zip(res.keys(), vals.tolist()))

    def train(self) -> None:
        done = False
        for epoch in range(self.epoch, self.epochs):
            self.epoch = epoch
            self.sampler.set_epoch(epoch, skip=self.batches_done)
            self.train_set.set_epoch(epoch)
            t0 = time.perf_counter()
            n_img = 0
            for images, tokens, ids in self.loader:
                if self.batches_done >= self.steps_per_epoch:
                    break
                if self._resume_rng is not None:  # restore just before the first resumed step
                    ckpt.set_rng_state(self._resume_rng)
                    self._resume_rng = None
                m = self._step(images, tokens, ids)
                self.global_step += 1
                self.batches_done += 1
                n_img += images.shape[0] * self.world
                if self.rank == 0 and self.global_step % self.log_every == 0:
                    m.update(
                        lr=self.optimizer.param_groups[0]["lr"],
                        temperature=1 / float(self.model.logit_scale().detach()),
                    )
                    m["images_per_s"] = n_img / (time.perf_counter() - t0)
                    if self.logger is not None:
                        self.logger.log_dict(m, step=self.global_step)
                    print(
                        f"step {self.global_step} | "
                        + " | ".join(f"{k}:{v:.4f}" for k, v in m.items()),
                        flush=True,
                    )
                if self.save_every and self.global_step % self.save_every == 0:
                    self.save_checkpoint(f"step_{self.global_step}")
                if self.max_steps and self.global_step >= self.max_steps:
                    done = True
                    if not (self.save_every and self.global_step % self.save_every == 0):
                        self.save_checkpoint(f"step_{self.global_step}")
                    break
            if done:
                break
            self.batches_done = 0
            self.epoch = epoch + 1
            self.save_checkpoint(f"epoch_{epoch}")
            self.evaluate(self.output_dir / f"epoch_{epoch}")
            if self.rank == 0:
                plot_run(self.output_dir)  # output_dir/plots/*.png, redrawn each epoch
        if done and self.rank == 0:
            plot_run(self.output_dir)  # stopped by max_steps inside an epoch

    @torch.no_grad()
    def evaluate(self, folder: Path) -> dict[str, float] | None:
        """Retrieval on ``val_dataset``: writes ``folder/retrieval.safetensors``, logs itm_eval."""
        if self.val_samples is None:
            return None
        from medtune.eval.retrieval_metrics import itm_eval, save_retrieval

        self.model.eval()
        sims = retrieval_scores(
            self.model, self.tokenizer, self.val_samples, batch_size=self.batch_size, device=self.device,
            k_test=self.k_test, num_workers=self.num_workers,
        )  # fmt: skip
        self.model.train()
        metrics = itm_eval(sims["sim_i2t"], sims.get("sim_t2i"), sims["txt2img"])
        if self.rank == 0:
            save_retrieval(folder / "retrieval.safetensors", sims["sim_i2t"], sims["txt2img"], sims.get("sim_t2i"),
                           metadata={"checkpoint": str(folder), "rule": sims["rule"]})  # fmt: skip
            if self.logger is not None:
                self.logger.log_dict(
                    {f"val_{k}": v for k, v in metrics.items()}, step=self.global_step
                )
            print(
                "retrieval | " + " | ".join(f"{k}:{v:.2f}" for k, v in metrics.items()), flush=True
            )
        return metrics

    def cleanup(self) -> None:
        if self.logger is not None:
            self.logger.close()
        from medtune.utils.distributed import destroy

        destroy()


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    recipe = ContrastivePretrainRecipe(cfg)
    recipe.setup()
    try:
        recipe.train()
    finally:
        recipe.cleanup()


if __name__ == "__main__":
    sys.exit(run_entry("contrastive_pretrain", recipe_main))
