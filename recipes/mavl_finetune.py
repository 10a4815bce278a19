"""Fine-tune MAVL's pretrained ResNet trunk: classification (RSNA, SIIM-ACR, ChestX-ray14, CheXpert)
or SIIM-ACR segmentation with MAVL's ResUNet, on a fraction of the labels.

    medtune run mavl_finetune --config demo_classification
    medtune run mavl_finetune --config demo_segmentation
    medtune run mavl_finetune --config rsna_classification data_dir=/data/rsna \\
        pretrained=outputs/mavl_pretrain_mimic_resnet50/epoch_59 label_fraction=0.01
    medtune run mavl_finetune --config siim_segmentation data_dir=/data/siimacr pretrained=/models/MAVL/checkpoint_full_46.pth

Features (all set in the config):

- **task: classification**: ``model`` = :func:`medtune.models.mavl.finetune.mavl_classifier` (ResNet
  up to average pooling and a linear head, MAVL's ``MAVL_ft``), ``BCEWithLogitsLoss``;
  validation AUROC picks the best epoch; the test split is predicted with it into
  ``output_dir/predictions.jsonl`` (``medtune score``: AUROC, MAVL's test-chosen max-F1 ``*_mavl``,
  and F1 at validation-chosen thresholds from ``val_predictions.jsonl``) and ``metrics.json``.
- **task: segmentation**: ``model`` = :func:`medtune.models.mavl.finetune.mavl_resunet` (MAVL's
  ``ModelResUNet_MAVL_ft``), MAVL's ``DiceBCELoss``; validation Dice picks the best epoch; test Dice
  (MAVL's ``metric.dice``: empty masks score 1 when nothing is predicted) in ``metrics.json``.
- ``pretrained``: a ``mavl_pretrain`` checkpoint folder or MAVL's released ``.pth`` (trunk only).
- **Data**: ``train_dataset`` / ``val_dataset`` / ``test_dataset``: any labelled-image reader; MAVL's
  split files through ``medtune.data.mavl_splits.mavl_rsna`` / ``mavl_siim`` (boxes / run-length
  masks give the segmentation targets). ``label_fraction`` (MAVL's ``data_pct``: 0.01, 0.1, 1.0)
  keeps that share of the training images, drawn with ``seed`` (MAVL draws without a seed and
  without stratification). ``augment`` (classification only) is seeded per item.
- **Optimization**: AdamW (MAVL: lr 1e-5, wd 0.02), ``lr_scheduler``, ``epochs``, ``max_steps_per_epoch``.
- **Checkpoints**: ``output_dir/epoch_{k}/model.safetensors`` + ``config.yaml``, ``recipe_state.pt``
  (optimizer, scheduler, step, data position, every rank's RNG, best epoch);
  ``resume_from_checkpoint=True`` continues a stopped run and reproduces the uninterrupted one bit
  for bit. ``save_every_n_steps`` adds ``step_{n}/`` checkpoints within an epoch.
- **Distributed**: ``medtune run --nproc_per_node N mavl_finetune ...`` (gloo on CPU, NCCL on CUDA):
  DDP, each rank a shard of every epoch (``batch_size`` per rank); validation and test images are
  split over the ranks and gathered, rank 0 writes. The classification loss is normalised over the
  global batch, so N ranks x B equal one process x N*B when ``sync_batchnorm: true`` (batch-norm
  statistics over all ranks, :mod:`medtune.training.sync_batchnorm`) and augmentation and dropout
  are off; MAVL's DDP keeps per-rank statistics (``false``). The segmentation loss (MAVL's
  ``DiceBCELoss``, Dice over the whole batch) is per rank, as under MAVL's DDP.
- **Bad input** stops with one ``mavl_finetune: error:`` line naming the file, row or key.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torchtune import config

from medtune.training import checkpointing as ckpt
from medtune.training import finetune_mavl as ft
from medtune.training.data import build_dataloader
from medtune.training.trackers import build_metric_logger
from medtune.utils.config import cfg_get, check_keys, non_negative, one_of, positive
from medtune.utils.distributed import (
    all_reduce_sum,
    barrier,
    destroy,
    init_process_group,
    resolve_device,
)
from medtune.utils.errors import ConfigError, UserError, run_entry
from medtune.viz.curves import plot_run

SUPPORTS_DISTRIBUTED = True

KNOWN_KEYS = {
    "output_dir", "assets_dir", "data_dir", "rsna_dir", "siim_dir", "task", "model", "pretrained", "train_dataset", "val_dataset",
    "test_dataset", "classes", "label_fraction", "image_size", "augment", "optimizer", "lr_scheduler",
    "metric_logger", "device", "seed", "batch_size", "epochs", "max_steps_per_epoch", "num_workers",
    "log_every_n_steps", "resume_from_checkpoint", "save_every_n_steps", "sync_batchnorm",
}  # fmt: skip


class MAVLFinetuneRecipe:
    """MAVL fine-tuning; see the module docstring."""

    name = "mavl_finetune"

    def __init__(self, cfg: DictConfig) -> None:
        check_keys(cfg, KNOWN_KEYS, self.name)
        self.cfg = cfg
        self.output_dir = Path(cfg_get(cfg, "output_dir", str))
        self.task = cfg_get(cfg, "task", str, check=one_of("classification", "segmentation"))
        self.device = resolve_device(cfg_get(cfg, "device", str, "auto"))
        self.seed = cfg_get(cfg, "seed", int, 0)
        self.batch_size = cfg_get(cfg, "batch_size", int, check=positive())
        self.epochs = cfg_get(cfg, "epochs", int, check=positive())
        self.max_steps_per_epoch = cfg_get(cfg, "max_steps_per_epoch", int, None, check=positive())
        self.num_workers = cfg_get(cfg, "num_workers", int, 0, check=non_negative())
        self.log_every = cfg_get(cfg, "log_every_n_steps", int, 1, check=positive())
        self.image_size = cfg_get(cfg, "image_size", int, 224, check=positive())
        self.resume = cfg_get(cfg, "resume_from_checkpoint", bool, False)
        self.save_every = cfg_get(cfg, "save_every_n_steps", int, None, check=positive())
        self.global_step = self.epoch = self.batches_done = 0
        self.best: tuple[float, int] | None = None

    def setup(self) -> None:
        cfg = self.cfg
        self.rank, self.world = init_process_group(self.device)
        torch.manual_seed(self.seed)
        self.classes = cfg_get(cfg, "classes", list, None)
        if self.task == "classification" and not self.classes:
            raise ConfigError("classes: task classification needs the list of classes")
        n_out = len(self.classes) if self.task == "classification" else 1
        self.model = config.instantiate(
            cfg.model, n_out, pretrained=cfg_get(cfg, "pretrained", str, None)
        )
        self.model.to(self.device)
        self.train_model = self.model
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            if cfg_get(cfg, "sync_batchnorm", bool, False):
                from medtune.training.sync_batchnorm import convert_global_batchnorm

                convert_global_batchnorm(self.model)
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = DDP(self.model, device_ids=ids)
        train = config.instantiate(cfg.train_dataset)
        train = ft.label_fraction(train, cfg_get(cfg, "label_fraction", float, 1.0), self.seed)
        augment = cfg.get("augment")
        augment = OmegaConf.to_container(augment, resolve=True) if augment else None
        self.train_set = ft.FinetuneImages(train, self.task, self.classes, self.image_size, train=True,
                                           augment=augment, seed=self.seed)  # fmt: skip
        self.val_items = config.instantiate(cfg.val_dataset)
        if not len(self.train_set) or not self.val_items:
            raise UserError("train_dataset / val_dataset: no images")
        _, self.loader, self.sampler = build_dataloader(
            self.train_set, batch_size=self.batch_size, collate_fn=torch.utils.data.default_collate,
            shuffle=True, seed=self.seed, rank=self.rank, world_size=self.world,
            num_workers=self.num_workers,
        )  # fmt: skip
        self.steps_per_epoch = len(self.loader)
        if self.max_steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, self.max_steps_per_epoch)
        self.optimizer = config.instantiate(cfg.optimizer, self.model.parameters())
        self.lr_scheduler = config.instantiate(
            cfg.lr_scheduler, self.optimizer, num_training_steps=self.steps_per_epoch * self.epochs
        )
        self.logger = build_metric_logger(cfg, self.rank == 0)  # resolved config logged once
        self._resume_rng = None
        if self.resume:
            self._load_state()
        if self.rank == 0:
            print(f"{self.task}: {len(self.train_set)} training images (label_fraction "
              f"{cfg_get(cfg, 'label_fraction', float, 1.0)}), {sum(p.numel() for p in self.model.parameters()):,} "
              "parameters", flush=True)  # fmt: skip

    def _load_state(self) -> None:
        state = ckpt.load_recipe_state(self.output_dir)
        self.model.load_state_dict(
            ckpt.read_trained(self.output_dir / state["checkpoint"], "resume_from_checkpoint")
        )
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.global_step, self.epoch, self.batches_done = (
            state["step"],
            state["epoch"],
            state["batches_done"],
        )
        self.best = tuple(state["best"]) if state.get("best") else None
        self._resume_rng = state["rng"]

    def save_checkpoint(self, name: str) -> None:
        """``output_dir/<name>/`` (weights + config) and ``output_dir/recipe_state.pt`` (rank 0
        writes; every rank's RNG state is gathered first)."""
        rng = ckpt.rng_states()  # a collective: every rank
        if self.rank == 0:
            sd = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
            ckpt.save_trained(sd, self.output_dir / name, OmegaConf.to_yaml(self.cfg, resolve=True))
            ckpt.save_recipe_state(self.output_dir, {
                "checkpoint": name, "step": self.global_step, "epoch": self.epoch,
                "batches_done": self.batches_done, "optimizer": self.optimizer.state_dict(),
                "lr_scheduler": self.lr_scheduler.state_dict(), "rng": rng,
                "best": list(self.best) if self.best else None,
            })  # fmt: skip
        barrier()

    def _loss(self, x, y, known) -> torch.Tensor:
        out = self.train_model(x.to(self.device))
        if self.task == "classification":
            known = known.to(self.device)
            # sum over the known labels / their global count, x world for DDP's gradient mean
            n = all_reduce_sum(known.sum().float()) / self.world
            return ft.masked_bce(out, y.to(self.device), known, total=n)
        return ft.dice_bce_loss(out, y.to(self.device))

    @torch.no_grad()
    def predict(self, items) -> tuple[torch.Tensor, torch.Tensor]:
        """Sigmoid outputs and targets of ``items`` (eval mode), every rank predicting
        ``items[rank::world]``; the full tensors, in item order, on every rank."""
        self.model.eval()
        mine = list(range(self.rank, len(items), self.world))
        ds = ft.FinetuneImages([items[i] for i in mine], self.task, self.classes, self.image_size)
        loader = torch.utils.data.DataLoader(
            ds, batch_size=self.batch_size, num_workers=self.num_workers
        )
        probs, targets = [], []
        for x, y, _ in loader:
            probs.append(torch.sigmoid(self.model(x.to(self.device))).float().cpu())
            targets.append(y)
        self.model.train()
        local = (mine, torch.cat(probs) if probs else None, torch.cat(targets) if targets else None)
        parts = [local]
        if self.world > 1:
            import torch.distributed as dist

            parts = [None] * self.world
            dist.all_gather_object(parts, local)
        order = [i for idx, _, _ in parts for i in idx]
        prob = torch.cat([p for _, p, _ in parts if p is not None])
        target = torch.cat([t for _, _, t in parts if t is not None])
        perm = torch.argsort(torch.tensor(order))
        return prob[perm], target[perm]

    def _score(self, items) -> float:
        prob, target = self.predict(items)
        if self.task == "segmentation":
            return ft.mavl_dice(prob, target)["dice"]
        from medtune.eval.classification_metrics import score_classification_rows
        from medtune.eval.zero_shot import prediction_rows

        auc = score_classification_rows(prediction_rows(items, self.classes, prob, "sigmoid"))[
            "auroc_macro"
        ]
        return float("nan") if auc is None else float(auc)

    def train(self) -> None:
        self.model.train()
        for epoch in range(self.epoch, self.epochs):
            self.epoch = epoch
            self.sampler.set_epoch(epoch, skip=self.batches_done)
            self.train_set.set_epoch(epoch)
            t0 = time.perf_counter()
            for x, y, known in self.loader:
                if self.batches_done >= self.steps_per_epoch:
                    break
                if self._resume_rng is not None:
                    ckpt.set_rng_state(self._resume_rng)
                    self._resume_rng = None
                loss = self._loss(x, y, known)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                self.lr_scheduler.step()
                self.global_step += 1
                self.batches_done += 1
                # the global batch's loss (the classification loss is scaled for DDP's mean)
                logged = float(all_reduce_sum(loss.detach().float().cpu().clone()) / self.world)
                if self.rank == 0 and self.global_step % self.log_every == 0:
                    m = {"loss": logged, "lr": self.optimizer.param_groups[0]["lr"],
                         "images_per_s": self.batches_done * self.batch_size * self.world
                         / (time.perf_counter() - t0)}  # fmt: skip
                    if self.logger is not None:
                        self.logger.log_dict(m, step=self.global_step)
                    print(
                        f"step {self.global_step} | "
                        + " | ".join(f"{k}:{v:.4f}" for k, v in m.items()),
                        flush=True,
                    )
                if self.save_every and self.global_step % self.save_every == 0:
                    self.save_checkpoint(f"step_{self.global_step}")
            val = self._score(self.val_items)
            key = "val_auroc" if self.task == "classification" else "val_dice"
            if self.rank == 0:
                if self.logger is not None:
                    self.logger.log_dict({key: val}, step=self.global_step)
                print(f"epoch {epoch} | {key} {val:.4f}", flush=True)
            if self.best is None or val > self.best[0]:
                self.best = (val, epoch)
            self.batches_done = 0
            self.epoch = epoch + 1
            self.save_checkpoint(f"epoch_{epoch}")
            if self.rank == 0:
                plot_run(self.output_dir)
        self.test()

    def test(self) -> dict:
        """Predict the test split with the best validation epoch; write predictions and metrics."""
        from medtune.utils.jsonl import write_jsonl_atomic, write_text_atomic

        best_val, best_epoch = self.best
        self.model.load_state_dict(
            ckpt.read_trained(self.output_dir / f"epoch_{best_epoch}", "best epoch")
        )
        items = config.instantiate(self.cfg.test_dataset)
        prob, target = self.predict(items)
        if self.task == "segmentation":
            metrics = ft.mavl_dice(prob, target)
        else:
            from medtune.eval.classification_metrics import score_classification_rows
            from medtune.eval.zero_shot import prediction_rows

            rows = prediction_rows(items, self.classes, prob, "sigmoid")
            vp, _ = self.predict(self.val_items)
            val_rows = prediction_rows(self.val_items, self.classes, vp, "sigmoid")
            if self.rank == 0:
                write_jsonl_atomic(self.output_dir / "predictions.jsonl", rows)
                write_jsonl_atomic(self.output_dir / "val_predictions.jsonl", val_rows)
            metrics = score_classification_rows(rows, val_rows)
        metrics.update(best_epoch=best_epoch, best_val=best_val, task=self.task)
        if self.rank != 0:
            return metrics
        write_text_atomic(self.output_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        shown = {
            k: metrics[k]
            for k in ("auroc_macro", "f1_max_mavl", "dice", "dice_pos", "dice_neg")
            if k in metrics
        }
        print(
            f"test (best epoch {best_epoch}) | " + " | ".join(f"{k} {v}" for k, v in shown.items()),
            flush=True,
        )
        return metrics

    def cleanup(self) -> None:
        if self.logger is not None:
            self.logger.close()
        destroy()


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    recipe = MAVLFinetuneRecipe(cfg)
    recipe.setup()
    try:
        recipe.train()
    finally:
        recipe.cleanup()


if __name__ == "__main__":
    sys.exit(run_entry("mavl_finetune", recipe_main))
