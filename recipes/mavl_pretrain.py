"""MAVL pretraining (CVPR 2024, HieuPhan33/CVPR2024_MAVL) on MIMIC-CXR with MedKLIP's entity files.

    medtune run mavl_pretrain --config demo
    medtune run mavl_pretrain --config mimic_resnet50 data_dir=/data/MIMIC-CXR-JPG \\
        entity_dir=/data/MedKLIP/data_file text_model_dir=/models/Bio_ClinicalBERT \\
        books_dir=/data/MAVL
    medtune run --nproc_per_node 8 mavl_pretrain --config mimic_resnet50 ...
    medtune run zero_shot_classify --config chestxray14_mavl checkpoint=outputs/mavl_pretrain_mimic_resnet50/epoch_59

Features (all set in the config):

- **Model** (``model``): :func:`medtune.models.mavl.mavl_model`: a ResNet cut after layer3 with
  attention pooling (``trunk_checkpoint``: torchvision ImageNet weights, as MAVL's
  ``pretrained: True``) or, with ``backbone: vit``, a ViT tower named by ``vision`` (a timm ViT,
  an open_clip ViT or BiomedCLIP: patch tokens as keys, CLS as the global feature;
  ``mimic_vit_biomedclip``), the knowledge books (anatomy, disease descriptions, concept aspects)
  encoded once by the frozen BERT in ``text_model_dir``, and the pre-norm query decoder (N layers,
  H heads, ``d_model``, FFN 1024, dropout 0.1) over the patch grid. Followed: MAVL's
  ``Pretrain/models/model_MAVL.py``, ``transformer.py``, ``train_MAVL.py``, ``configs/MAVL_resnet.yaml``.
- **Loss** (``loss``: :class:`medtune.models.mavl.MAVLLoss`): presence CE ignoring labels -1 / 2
  (``ce``), location contrastive over 8 anatomy candidates (``location``), global concept-image
  soft-target contrastive with a learnable temperature per concept (``cl_global``); each part is
  logged (``ce``, ``cl``, ``global``).
- **Data** (``dataset``: :func:`medtune.data.mavl_entities.mavl_entities`): MedKLIP's
  ``rad_graph_metric_{train,validate,test}.json`` + ``landmark_observation_adj_mtx.npy``; MAVL
  trains on all three JSON files. Augmentation (``augment``: random resized crop 0.2-1, flip) and
  the location draws are seeded per ``(seed, epoch, index)``. ``image`` sets size and ImageNet
  mean/std.
- **Optimization**: AdamW (weight decay 0.02 except on biases, norms and 1-d parameters, as
  MAVL's ``create_optimizer``), ``lr_scheduler`` (torchtune's cosine with warm-up per step; MAVL
  uses timm's per-epoch cosine from 1e-4 to 1e-5 with 5 warm-up epochs), ``clip_grad_norm``,
  ``max_steps_per_epoch``, ``max_steps``.
- **Checkpoints**: ``output_dir/epoch_{k}/model.safetensors`` (medtune names; the books are rebuilt
  from the config) + ``config.yaml``; ``output_dir/recipe_state.pt`` (optimizer, scheduler, step,
  data position, every rank's RNG). ``resume_from_checkpoint=True`` continues and reproduces the uninterrupted
  run bit for bit. ``save_every_n_steps`` adds ``step_{n}/``.
- **Distributed**: ``--nproc_per_node N`` (gloo on CPU, NCCL on CUDA), DDP. The loss is normalised
  over the global batch and the text-to-image term gathers every rank's rows, so N ranks x B equal
  one process x N*B when ``sync_batchnorm: true`` (batch-norm statistics over the global batch,
  :mod:`medtune.training.sync_batchnorm`, any backend); MAVL itself keeps per-rank statistics
  (``false``). Dropout masks are drawn per rank.
- **Logging**: stdout, ``metric_logger`` (DiskLogger), curves in ``output_dir/plots/``.
- **Bad input** stops with one ``mavl_pretrain: error:`` line naming the file, row or key.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torchtune import config

from medtune.data.mavl_entities import MAVLPretrainDataset, collate_mavl
from medtune.training import checkpointing as ckpt
from medtune.training.data import build_dataloader
from medtune.training.trackers import build_metric_logger
from medtune.utils.config import cfg_get, check_keys, non_negative, positive
from medtune.utils.distributed import all_reduce_sum, barrier, init_process_group, resolve_device
from medtune.utils.errors import ConfigError, UserError, run_entry
from medtune.viz.curves import plot_run

SUPPORTS_DISTRIBUTED = True

KNOWN_KEYS = {
    "output_dir", "assets_dir", "data_dir", "entity_dir", "books_dir", "text_model_dir", "vision_dir",
    "model", "loss", "dataset", "image", "augment", "optimizer", "lr_scheduler", "metric_logger", "device",
    "seed", "batch_size", "epochs", "max_steps_per_epoch", "max_steps", "clip_grad_norm",
    "autocast", "num_workers", "log_every_n_steps", "save_every_n_steps", "resume_from_checkpoint",
    "sync_batchnorm",
}  # fmt: skip


class MAVLPretrainRecipe:
    """MAVL pretraining; see the module docstring."""

    name = "mavl_pretrain"

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
        self.log_every = cfg_get(cfg, "log_every_n_steps", int, 1, check=positive())
        self.save_every = cfg_get(cfg, "save_every_n_steps", int, None, check=positive())
        self.autocast = cfg_get(cfg, "autocast", bool, False) and self.device.type == "cuda"
        self.num_workers = cfg_get(cfg, "num_workers", int, 0, check=non_negative())
        self.resume = cfg_get(cfg, "resume_from_checkpoint", bool, False)
        self.global_step = self.epoch = self.batches_done = 0

    # ----------------------------------------------------------------------------- setup
    def setup(self) -> None:
        cfg = self.cfg
        self.rank, self.world = init_process_group(self.device)
        torch.manual_seed(self.seed)
        model = config.instantiate(cfg.model)
        if not hasattr(model, "concept_book"):
            raise ConfigError("model: expected a medtune.models.mavl.mavl_model builder")
        size = cfg_get(cfg, "image.image_size", int)
        if size != model.image.image_size:  # the pool's / ViT's positions fix the input size
            raise ConfigError(f"image.image_size: {size} px, but the model's image side takes "
                              f"{model.image.image_size} px")  # fmt: skip
        self.model = model.to(self.device)
        self.loss_fn = config.instantiate(cfg.loss)
        self.train_model = self.model
        if self.world > 1 and cfg_get(cfg, "sync_batchnorm", bool, False):
            from medtune.training.sync_batchnorm import convert_global_batchnorm

            convert_global_batchnorm(self.model)
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            # without the location term location_emb gets no gradient
            self.train_model = DDP(self.model, device_ids=ids,
                                   find_unused_parameters=not self.loss_fn.location)  # fmt: skip
        decay, no_decay = [], []
        for n, p in self.model.named_parameters():
            (no_decay if p.ndim < 2 or n.endswith(".bias") else decay).append(p)
        self.optimizer = config.instantiate(
            cfg.optimizer, [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
        )
        augment = cfg.get("augment")
        augment = OmegaConf.to_container(augment, resolve=True) if augment else None
        image = OmegaConf.to_container(cfg.image, resolve=True)
        self.train_set = MAVLPretrainDataset(config.instantiate(cfg.dataset), image, train=True,
                                             augment=augment, seed=self.seed)  # fmt: skip
        if not len(self.train_set):
            raise UserError("dataset: no images")
        _, self.loader, self.sampler = build_dataloader(
            self.train_set, batch_size=self.batch_size, collate_fn=collate_mavl, shuffle=True,
            seed=self.seed, rank=self.rank, world_size=self.world, num_workers=self.num_workers,
        )  # fmt: skip
        self.steps_per_epoch = len(self.loader)
        if self.max_steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, self.max_steps_per_epoch)
        self.lr_scheduler = config.instantiate(
            cfg.lr_scheduler, self.optimizer, num_training_steps=self.steps_per_epoch * self.epochs
        )
        self.logger = build_metric_logger(cfg, self.rank == 0)  # resolved config logged once
        self._resume_rng = None
        if self.resume:
            self._load_state()
        if self.rank == 0:
            self._print_params()

    def _print_params(self) -> None:
        parts = {"image": self.model.image, "query_proj": self.model.query_proj,
                 "decoder": self.model.decoder, "heads": nn.ModuleList([self.model.location_emb,
                                                                        self.model.classifier])}  # fmt: skip
        print(f"{'part':<12}{'params':>12}")
        for name, mod in parts.items():
            print(f"{name:<12}{sum(p.numel() for p in mod.parameters()):>12,}")
        print(f"{'total':<12}{sum(p.numel() for p in self.model.parameters()):>12,} "
              f"({self.model.n_entities} entities x {self.model.n_concepts} concepts)")  # fmt: skip

    # ----------------------------------------------------------------------------- state
    def _load_state(self) -> None:
        state = ckpt.load_recipe_state(self.output_dir)
        sd = ckpt.read_trained(self.output_dir / state["checkpoint"], "resume_from_checkpoint")
        missing, unexpected = self.model.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise UserError(f"{self.output_dir / state['checkpoint']}: weights do not match the model "
                            f"(missing {missing[:3]}, unexpected {unexpected[:3]})")  # fmt: skip
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.global_step, self.epoch = state["step"], state["epoch"]
        self.batches_done = state["batches_done"]
        self._resume_rng = state["rng"]

    def save_checkpoint(self, name: str) -> None:
        """``output_dir/<name>/`` (weights + config) and ``output_dir/recipe_state.pt``."""
        rng = ckpt.rng_states()  # a collective: every rank's state (dropout draws differ by rank)
        if self.rank == 0:
            sd = {k: v.detach().to("cpu").contiguous() for k, v in self.model.state_dict().items()}
            ckpt.save_trained(sd, self.output_dir / name, OmegaConf.to_yaml(self.cfg, resolve=True))
            ckpt.save_recipe_state(self.output_dir, {
                "checkpoint": name, "step": self.global_step, "epoch": self.epoch,
                "batches_done": self.batches_done, "optimizer": self.optimizer.state_dict(),
                "lr_scheduler": self.lr_scheduler.state_dict(), "rng": rng,
            })  # fmt: skip
        barrier()

    # ----------------------------------------------------------------------------- train
    def _step(self, images, labels, index) -> dict[str, float]:
        images, labels, index = (t.to(self.device) for t in (images, labels, index))
        ctx = (
            torch.autocast("cuda", torch.bfloat16)
            if self.autocast
            else torch.autocast("cpu", enabled=False)
        )
        with ctx:
            out = self.train_model(images)
            res = self.loss_fn(self.model, out, labels, index)
        self.optimizer.zero_grad(set_to_none=True)
        res["loss"].backward()
        if self.clip_grad_norm:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        # "loss" is scaled for DDP's gradient mean; the logged loss is the sum of the global parts
        parts = torch.stack([res["ce"], res["cl"], res["global"]]).detach().float().cpu()
        parts = all_reduce_sum(parts) / self.world
        return {"loss": float(parts.sum()), "ce": float(parts[0]), "cl": float(parts[1]),
                "global": float(parts[2])}  # fmt: skip

    def train(self) -> None:
        done = False
        for epoch in range(self.epoch, self.epochs):
            self.epoch = epoch
            self.sampler.set_epoch(epoch, skip=self.batches_done)
            self.train_set.set_epoch(epoch)
            t0, n_img = time.perf_counter(), 0
            for images, labels, index in self.loader:
                if self.batches_done >= self.steps_per_epoch:
                    break
                if self._resume_rng is not None:  # restore just before the first resumed step
                    ckpt.set_rng_state(self._resume_rng)
                    self._resume_rng = None
                m = self._step(images, labels, index)
                self.global_step += 1
                self.batches_done += 1
                n_img += images.shape[0] * self.world
                if self.rank == 0 and self.global_step % self.log_every == 0:
                    m["lr"] = self.optimizer.param_groups[0]["lr"]
                    m["images_per_s"] = n_img / (time.perf_counter() - t0)
                    if self.logger is not None:
                        self.logger.log_dict(m, step=self.global_step)
                    print(f"step {self.global_step} | " + " | ".join(f"{k}:{v:.4f}" for k, v in m.items()),
                          flush=True)  # fmt: skip
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
            if self.rank == 0:
                plot_run(self.output_dir)  # output_dir/plots/*.png, redrawn each epoch
        if self.rank == 0:
            plot_run(self.output_dir)

    def cleanup(self) -> None:
        if self.logger is not None:
            self.logger.close()
        from medtune.utils.distributed import destroy

        destroy()


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    recipe = MAVLPretrainRecipe(cfg)
    recipe.setup()
    try:
        recipe.train()
    finally:
        recipe.cleanup()


if __name__ == "__main__":
    sys.exit(run_entry("mavl_pretrain", recipe_main))
