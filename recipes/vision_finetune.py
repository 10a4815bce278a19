"""Vision-only tuning of a MedVLM: train the image encoder and connector, keep Llama-3 frozen.

    medtune run vision_finetune --config slake
    medtune run --nproc_per_node 8 vision_finetune --config slake
    medtune cp vision_finetune/slake my_slake.yaml   # edit, then: medtune run vision_finetune --config my_slake.yaml
    medtune cp vision_finetune my_vision.py          # the recipe itself: edit its loop, then
    medtune run my_vision.py --config vision_finetune/slake

Features (all set in the config):

- **Model**: any ``_component_`` that returns a :class:`medtune.models.medvlm.MedVLM` (named
  builders in ``medtune.models.builders``). Llama-3 weights load through torchtune's checkpointer
  (``checkpointer``: HF or Meta layout). ``init_from`` starts the trained parts from an earlier
  medtune checkpoint folder (e.g. caption pre-training, then VQA), or takes a mapping encoder ->
  ``qformer_pretrain`` checkpoint (stage 2 of BLIP-2 / MSMedCap: one stage-1 Q-Former per encoder,
  merged by configuration).
- **Trainable parts**: ``trainable.encoder`` ``full | frozen``, ``trainable.connector``
  ``full | frozen | projection`` (only the connector's final projection: XrayGPT's variant); ``trainable.llm`` stays ``frozen`` (use the full/LoRA recipes otherwise). A
  table of parameter counts per part is printed at start-up.
- **Precision**: trained parts keep fp32 master weights; ``llm_dtype: bf16`` holds the frozen LLM in
  bf16; ``autocast: true`` runs compute under bf16 autocast on CUDA.
- **Optimization**: ``optimizer``, ``lr_scheduler`` and ``loss`` are components (AdamW; a
  bitsandbytes optimizer falls back to torch AdamW when bitsandbytes is missing; torchtune's
  cosine schedule with warm-up; :class:`medtune.training.loss.AnswerCrossEntropy`), a learning rate
  per part (``lr.encoder``, ``lr.connector``), ``clip_grad_norm``, ``gradient_accumulation_steps``,
  ``enable_activation_checkpointing``. The loss is the mean over all answer tokens of the global
  batch (summed per rank, divided by the all-reduced token count), so N processes with batch B
  give the same loss and update as one process with batch N*B. Logits are computed only at the
  answer positions (:func:`medtune.models.medvlm.output_at`).
- **Data**: ``dataset`` / ``val_dataset`` are any medtune reader (``medtune.data.slake``, ...)
  returning samples; the model transform (:func:`medtune.data.model_transform.medvlm_transform`) turns
  them into tokens, labels and images: ``prompt_template`` (string or list, sampled per item),
  ``system_prompt``, ``augment`` (opt-in image augmentation), ``blank_images`` (question-only
  baseline), ``window`` (DICOM), ``max_seq_len``.
- **Throughput**: ``packed: true`` (with ``max_seq_len``) packs samples and their images into
  rows of ``max_seq_len`` tokens (block-diagonal causal attention, positions restarting per
  sample, the same per-token loss as unpacked; flex attention on CUDA); ``group_by_length: true``
  batches samples of similar length instead; ``compile: true`` compiles each decoder layer (and
  the blocks of trained encoders) with ``torch.compile``, as torchtune does.
- **Logging**: stdout and ``metric_logger`` (torchtune's DiskLogger by default), validation loss
  each epoch, tqdm progress (``TQDM_DISABLE=1`` hides it).
- **Checkpoints**: ``output_dir/epoch_{k}/model.safetensors`` (trained parts only) + ``config.yaml``,
  and ``output_dir/recipe_state.pt`` (optimizer, schedule, epoch, data position, every RNG).
  ``save_every_n_steps`` adds ``step_{n}/`` folders mid-epoch. ``resume_from_checkpoint=True``
  continues a killed run from the latest state and reproduces the uninterrupted run bit for bit
  (augmentation, dropout, shuffling, sampled templates and DataLoader workers included).
- **Bad input** (a missing or corrupt image, a row without a field, an LLM checkpoint of another
  width, a config key this recipe does not know) stops with one ``vision_finetune: error:`` line
  naming the file, row or key; ``MEDTUNE_TRACEBACK=1`` shows the traceback.
- **Distributed**: under torchrun (``medtune run --nproc_per_node N``): gloo on CPU, NCCL on CUDA;
  the trained parts are FSDP2-sharded (gradients averaged across ranks); ``shard_llm: true``
  also shards the frozen LLM per layer: it is built on ``meta``, rank 0 alone reads the checkpoint
  and every rank receives its shards (a 70B LLM needs this).

The loop is :meth:`VisionFinetuneRecipe.train` below: edit it in a copy (``medtune cp``). What the
recipes share are plain functions in ``medtune.training`` (set-up, data, loss, optimizer,
checkpoints).
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torchtune import config, training
from tqdm import tqdm

from medtune.data.model_transform import VisionChatDataset, medvlm_transform
from medtune.data.packing import attention_mask
from medtune.models.llama3 import decoder_dtype
from medtune.models.medvlm import output_at
from medtune.training import checkpointing as ckpt
from medtune.training.compile import compile_model
from medtune.training.data import build_dataloader
from medtune.training.distributed import (
    all_reduce_sum,
    barrier,
    destroy,
    init_process_group,
    is_distributed_env,
    resolve_device,
    shard_module,
)
from medtune.training.loss import answer_targets
from medtune.training.memory import estimate_memory, format_memory
from medtune.training.optim import (
    build_lr_scheduler,
    build_optimizer,
    param_groups,
    restore_lr_scheduler,
)
from medtune.training.params import parameter_table, set_trainable
from medtune.training.setup import (
    build_model,
    check_llm_mode,
    check_on_device,
    check_tokenizer,
    clean_name,
    decoder_of,
    is_vlm,
    load_sharded,
    load_unsharded,
    read_llm_state,
    shard_vlm,
)
from medtune.utils.config import cfg_get, check_keys, optional_component, positive
from medtune.utils.errors import ConfigError, run_entry

SUPPORTS_DISTRIBUTED = True
NAME = "vision_finetune"

KNOWN_KEYS = {
    "output_dir", "assets_dir", "data_dir", "model_dir", "encoder_dir",
    "tokenizer", "model", "checkpointer", "trainable", "llm_dtype", "autocast", "device",
    "dataset", "val_dataset", "prompt_template", "system_prompt", "augment", "blank_images",
    "window", "max_seq_len", "seed", "shuffle", "batch_size", "epochs", "max_steps_per_epoch",
    "gradient_accumulation_steps", "optimizer", "lr", "lr_scheduler", "loss", "clip_grad_norm",
    "enable_activation_checkpointing", "metric_logger", "log_every_n_steps", "num_workers",
    "resume_from_checkpoint", "save_every_n_steps", "packed", "group_by_length", "compile", "init_from", "shard_llm",
}  # fmt: skip


class VisionFinetuneRecipe:
    """Train encoder + connector of a MedVLM with a frozen Llama-3. See the module docstring."""

    def __init__(self, cfg: DictConfig) -> None:
        check_keys(cfg, KNOWN_KEYS, NAME)
        self.cfg = cfg
        self.device = resolve_device(cfg_get(cfg, "device", str, "auto"))
        self.distributed = is_distributed_env()  # one script: in-process or under torchrun
        self.rank, self.world_size = init_process_group(self.device) if self.distributed else (0, 1)
        self.is_rank_zero = self.rank == 0
        self.output_dir = Path(cfg_get(cfg, "output_dir", str))
        self.llm_dtype = decoder_dtype(cfg.get("llm_dtype", "fp32"))
        self.autocast = cfg_get(cfg, "autocast", bool, False) and self.device.type == "cuda"
        self.shard_llm = self.distributed and cfg_get(cfg, "shard_llm", bool, False)
        self.seed = cfg_get(cfg, "seed", int, 0)
        self.batch_size = cfg_get(cfg, "batch_size", int, check=positive())
        self.epochs = cfg_get(cfg, "epochs", int, check=positive())
        self.accum = cfg_get(cfg, "gradient_accumulation_steps", int, 1, check=positive())
        self.max_steps_per_epoch = cfg_get(cfg, "max_steps_per_epoch", int, None, check=positive())
        self.log_every = cfg_get(cfg, "log_every_n_steps", int, 1, check=positive())
        self.save_every = cfg_get(cfg, "save_every_n_steps", int, None, check=positive())
        self.clip = cfg_get(cfg, "clip_grad_norm", float, None, check=positive())
        self.epoch, self.global_step, self.batches_done = 0, 0, 0
        self.loss_history: list[float] = []
        ckpt.seed_everything(self.seed)  # the same seed on every rank: identical initial weights

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        """Tokenizer, model, loss, data, optimizer, schedule; resume; print the tables."""
        cfg = self.cfg
        self.output_dir.mkdir(parents=True, exist_ok=True)
        state = None
        if cfg_get(cfg, "resume_from_checkpoint", bool, False):
            state = ckpt.load_recipe_state(self.output_dir)
        self.tokenizer = config.instantiate(cfg.tokenizer)
        self.model = self._setup_model(state)
        self.loss_fn = config.instantiate(cfg.loss)
        self.metric_logger = None
        if self.is_rank_zero and cfg.get("metric_logger"):
            self.metric_logger = config.instantiate(cfg.metric_logger)
        self.train_ds, self.train_loader, self.sampler = self._setup_data(cfg.dataset, train=True)
        val = optional_component(cfg, "val_dataset")  # val_dataset=null switches it off
        self.val_loader = None
        if val is not None:
            self.val_loader = self._setup_data(val, train=False)[1]
        n_batches = len(self.train_loader)
        if self.max_steps_per_epoch is not None:
            n_batches = min(n_batches, self.max_steps_per_epoch * self.accum)
        self.steps_per_epoch = max(1, n_batches // self.accum)
        self.optimizer = build_optimizer(cfg.optimizer, param_groups(self.model, cfg.lr))
        self.lr_scheduler = build_lr_scheduler(
            cfg.get("lr_scheduler"), self.optimizer, self.steps_per_epoch * self.epochs
        )
        if state is not None:
            self._restore(state)
        if self.is_rank_zero:
            print(parameter_table(self.model, dict(cfg.trainable)), flush=True)
            mem = estimate_memory(self.model, self.optimizer, world_size=self.world_size)
            print(format_memory(mem, self.world_size), flush=True)
            print(
                f"{NAME}: {len(self.train_ds)} training samples, {self.steps_per_epoch} steps/epoch "
                f"x {self.epochs} epochs, global batch "
                f"{self.batch_size * self.world_size * self.accum} ({self.world_size} process(es), "
                f"device {self.device})",
                flush=True,
            )

    def _setup_model(self, state: dict[str, Any] | None) -> torch.nn.Module:
        """Build (LLM on ``meta`` when sharded) -> shard -> load one full state dict -> check."""
        cfg = self.cfg
        # the LLM on meta whether sharded or not: no random init of weights that are loaded next,
        # and the same RNG draws (encoder / connector init) on 1 and N processes
        model = build_model(cfg.model, device=self.device, dtype=self.llm_dtype, llm_on_meta=True)
        if not is_vlm(model):
            raise ConfigError(
                f"model: {NAME} needs a MedVLM (a builder from medtune.models.builders)"
            )
        check_llm_mode(model, "frozen", NAME)
        check_tokenizer(model, self.tokenizer)
        allowed = {
            "encoder": ("full", "frozen"),
            "connector": ("full", "frozen", "projection"),  # projection: XrayGPT's variant
            "llm": ("frozen",),
        }
        set_trainable(model, dict(cfg.trainable), allowed=allowed)
        decoder, prefix = decoder_of(model)
        if cfg_get(cfg, "enable_activation_checkpointing", bool, False):
            from torchtune.modules import TransformerSelfAttentionLayer

            training.set_activation_checkpointing(
                decoder, auto_wrap_policy={TransformerSelfAttentionLayer}
            )
            for enc in model.encoders.values():
                enc.set_grad_checkpointing(True)
        if cfg_get(cfg, "compile", bool, False):  # each decoder layer (+ trained encoder blocks)
            compile_model(model, decoder)
        # one full state dict: the LLM's weights (rank 0 only when sharded) + the trained parts
        # of the resumed checkpoint or of init_from
        full = read_llm_state(
            cfg.checkpointer, rank=self.rank, only_rank0=self.shard_llm, prefix=prefix
        )
        start = self._trained_start(model, state)
        if full is not None:
            full.update(start)
        source = f"checkpointer ({cfg.checkpointer.checkpoint_dir})"
        if self.shard_llm:
            shard_vlm(model, decoder)
            load_sharded(model, full, self.device, source)
        else:
            load_unsharded(model, full, self.device, source)
            if self.distributed:  # each rank holds the whole frozen LLM; trained parts are sharded
                for part in (*model.encoders.values(), *model.connectors.values()):
                    if any(p.requires_grad for p in part.parameters()):
                        shard_module(part)
        check_on_device(model)
        self.trained_names = [clean_name(n) for n, p in model.named_parameters() if p.requires_grad]
        if not self.trained_names:
            raise ConfigError("trainable: nothing to train")
        # checkpoints hold what trains plus what init_from gave (a frozen stage-1 Q-Former), so
        # that each checkpoint folder rebuilds the model on its own
        self.saved_names = sorted(set(self.trained_names) | set(start))
        return model

    def _trained_start(self, model: torch.nn.Module, state: dict[str, Any] | None) -> dict:
        """Tensors to start from: the resumed checkpoint, else ``init_from`` (a medtune checkpoint
        folder, or a mapping encoder -> ``qformer_pretrain`` checkpoint folder: MSMedCap's "train
        each Q-Former separately, then merge"), else none."""
        if state is not None:
            return ckpt.read_trained(self.output_dir / state["checkpoint"], "resume")
        init = self.cfg.get("init_from")
        if OmegaConf.is_dict(init):
            from medtune.training.stage1 import stage1_state_dict

            return stage1_state_dict(model, OmegaConf.to_container(init, resolve=True))
        if init:
            return ckpt.read_trained(init, "init_from")
        return {}

    def _setup_data(self, ds_cfg: DictConfig, train: bool):
        """Reader -> model transform -> dataset -> resumable loader."""
        cfg = self.cfg
        samples = config.instantiate(ds_cfg)
        template = cfg.get("prompt_template")
        transform = medvlm_transform(
            self.model,
            self.tokenizer,
            prompt_template=OmegaConf.to_container(template)
            if OmegaConf.is_list(template)
            else template,
            system_prompt=cfg.get("system_prompt"),
            max_seq_len=cfg_get(cfg, "max_seq_len", int, None, check=positive()),
            window=cfg.get("window"),
            blank_images=cfg_get(cfg, "blank_images", bool, False),
            augment=OmegaConf.to_container(cfg.augment) if train and cfg.get("augment") else None,
            seed=self.seed,
        )
        ds = VisionChatDataset(samples, transform, train=train)
        return build_dataloader(  # padded, packed (packed: true) or length-grouped batches
            ds,
            batch_size=self.batch_size,
            shuffle=train and cfg_get(cfg, "shuffle", bool, True),
            seed=self.seed,
            rank=self.rank,
            world_size=self.world_size,
            num_workers=cfg_get(cfg, "num_workers", int, 0),
            pad_id=self.tokenizer.pad_id,
            packed=cfg_get(cfg, "packed", bool, False),
            max_seq_len=cfg_get(cfg, "max_seq_len", int, None),
            group_by_length=train and cfg_get(cfg, "group_by_length", bool, False),
            dense_mask=self.device.type != "cuda",  # CUDA: a flex-attention BlockMask instead
        )

    def _restore(self, state: dict[str, Any]) -> None:
        """Optimizer, schedule, position and RNGs of the interrupted run."""
        ckpt.load_optimizer_state(self.model, self.optimizer, state["optimizer"], self.distributed)
        restore_lr_scheduler(self.lr_scheduler, self.optimizer, state["scheduler"])
        self.epoch, self.global_step = state["epoch"], state["global_step"]
        self.batches_done = state["batches_done"]
        self.loss_history = list(state.get("loss_history", []))
        ckpt.set_rng_state(state["rng"])  # last: nothing may draw between here and the next step
        if self.is_rank_zero:
            print(
                f"resumed from {self.output_dir / state['checkpoint']} at epoch {self.epoch}, "
                f"step {self.global_step} ({self.batches_done} batches into the epoch)",
                flush=True,
            )

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, tag: str) -> None:
        """Write ``output_dir/<tag>/`` (trained parts + config) and ``output_dir/recipe_state.pt``."""
        full = ckpt.gather_full_state(self.model, self.distributed, self.device)  # collective
        optim = ckpt.optimizer_state(self.model, self.optimizer, self.distributed)  # collective
        rng = ckpt.rng_states()  # collective: every rank's RNGs
        if self.is_rank_zero:
            folder = self.output_dir / tag
            trained = {k: full[k].contiguous() for k in self.saved_names}
            ckpt.save_trained(trained, folder, OmegaConf.to_yaml(self.cfg, resolve=True))
            ckpt.save_recipe_state(
                self.output_dir,
                {
                    "checkpoint": tag,
                    "epoch": self.epoch,
                    "global_step": self.global_step,
                    "batches_done": self.batches_done,
                    "optimizer": optim,
                    "scheduler": self.lr_scheduler.state_dict(),
                    "rng": rng,
                    "seed": self.seed,
                    "loss_history": self.loss_history,
                },
            )
            print(f"saved {folder}", flush=True)
        barrier()

    # ------------------------------------------------------------------ train
    def _batch_images(self, batch: dict[str, Any]) -> dict[str, torch.Tensor] | None:
        """The batch's images, or None for a batch without any. Under FSDP every rank must run the
        (sharded) encoders or none may."""
        n_img = int(batch["image_counts"].sum())
        if self.world_size > 1:
            ranks_with = int(all_reduce_sum(torch.tensor(int(n_img > 0), device=self.device)))
            if 0 < ranks_with < self.world_size and n_img == 0:
                raise ConfigError(
                    f"dataset: rank {self.rank} got a batch without images while other ranks have "
                    "images; mix text-only and image samples within each batch"
                )
        if n_img == 0:
            return None
        return {k: v.to(self.device) for k, v in batch["images"].items()}

    def _loss_step(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed loss over the batch's answer tokens, and their count: ``(loss_sum [], n [])``."""
        tokens = batch["tokens"].to(self.device)  # [b, s]
        targets, keep = answer_targets(batch["labels"].to(self.device))  # [b, s], [b, s]
        packing = {}  # packed rows: block-diagonal causal mask, positions restarting per sample
        if "input_pos" in batch:
            packing = {
                "mask": attention_mask(batch, self.device),
                "input_pos": batch["input_pos"].to(self.device),
            }
        images = self._batch_images(batch)  # encoder -> [n_img, 3, H, W]
        with (
            torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast),
            output_at(self.model.decoder, keep),  # logits only where there is a target
        ):
            logits = self.model(
                tokens, images=images, image_counts=batch["image_counts"], **packing
            )
        return self.loss_fn(logits, targets[keep]), keep.sum()

    def validate(self) -> float:
        """Mean validation loss over all answer tokens (all ranks)."""
        self.model.eval()
        tot = torch.zeros((), device=self.device)
        n = torch.zeros((), device=self.device, dtype=torch.long)
        with torch.no_grad():
            for batch in self.val_loader:
                loss, k = self._loss_step(batch)
                tot += loss.detach()
                n += k
        self.model.train()
        return float(all_reduce_sum(tot) / all_reduce_sum(n).clamp(min=1))

    def train(self) -> None:
        """Epochs of accumulated steps; validation and a checkpoint after each epoch."""
        self.model.train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        while self.epoch < self.epochs:
            self.train_ds.set_epoch(self.epoch)
            self.sampler.set_epoch(self.epoch, skip=self.batches_done)
            n_batches = self.steps_per_epoch * self.accum
            pbar = tqdm(
                total=self.steps_per_epoch,
                initial=self.batches_done // self.accum,
                desc=f"epoch {self.epoch}",
                leave=False,
                **({} if self.is_rank_zero else {"disable": True}),  # rank 0: TQDM_DISABLE decides
            )
            run_loss = torch.zeros((), device=self.device)
            run_tok = torch.zeros((), device=self.device, dtype=torch.long)
            t0 = time.perf_counter()
            for batch in self.train_loader:
                if self.batches_done >= n_batches:
                    break
                loss, n_tok = self._loss_step(batch)
                loss.backward()
                run_loss += loss.detach()
                run_tok += n_tok
                self.batches_done += 1
                if self.batches_done % self.accum:
                    continue
                # mean over the answer tokens of the global batch; FSDP averages gradients over
                # ranks, so scale by world_size / tokens
                glob_tok = all_reduce_sum(run_tok.clone()).clamp(min=1)
                step_loss = float(all_reduce_sum(run_loss.clone()) / glob_tok)
                training.scale_grads(self.model, self.world_size / glob_tok)
                grad_norm = None
                if self.clip is not None:
                    grad_norm = ckpt.full_tensor(
                        torch.nn.utils.clip_grad_norm_(params, max_norm=self.clip)
                    )
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.lr_scheduler.step()
                self.global_step += 1
                self.loss_history.append(step_loss)
                if self.is_rank_zero and self.global_step % self.log_every == 0:
                    lr = self.optimizer.param_groups[0]["lr"]
                    metrics = {
                        "loss": step_loss,
                        "lr": lr,
                        "tokens_per_second_per_gpu": float(run_tok) / (time.perf_counter() - t0),
                    }
                    if grad_norm is not None:
                        metrics["grad_norm"] = float(grad_norm)
                    if self.metric_logger is not None:
                        self.metric_logger.log_dict(metrics, step=self.global_step)
                    tqdm.write(
                        f"step {self.global_step} epoch {self.epoch} loss {step_loss:.4f} lr {lr:.2e}"
                    )
                pbar.update(1)
                run_loss.zero_()
                run_tok.zero_()
                t0 = time.perf_counter()
                if (
                    self.save_every
                    and self.global_step % self.save_every == 0
                    and self.batches_done < n_batches
                ):
                    self.save_checkpoint(f"step_{self.global_step}")
            pbar.close()
            last = self.loss_history[-1] if self.loss_history else math.nan
            msg = f"epoch {self.epoch} done: train loss {last:.4f}"
            if self.val_loader is not None:
                val = self.validate()
                msg += f", validation loss {val:.4f}"
                if self.metric_logger is not None:
                    self.metric_logger.log_dict({"val_loss": val}, step=self.global_step)
            if self.is_rank_zero:
                print(msg, flush=True)
            self.epoch += 1
            self.batches_done = 0
            self.save_checkpoint(f"epoch_{self.epoch - 1}")

    def cleanup(self) -> None:
        """Close the logger and the process group."""
        if self.metric_logger is not None:
            self.metric_logger.close()
        destroy()


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    recipe = VisionFinetuneRecipe(cfg)
    recipe.setup()
    recipe.train()
    recipe.cleanup()


if __name__ == "__main__":
    sys.exit(run_entry(NAME, recipe_main))
