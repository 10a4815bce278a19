"""Full fine-tuning of a MedVLM (or a plain Llama-3) on several devices with FSDP2.

    medtune run --nproc_per_node 2 full_finetune_distributed --config demo              # 2 CPU processes (gloo)
    medtune run --nproc_per_node 8 full_finetune_distributed --config slake model_dir=... encoder_dir=... data_dir=...
    medtune cp full_finetune_distributed my_full.py   # the recipe itself: edit its loop

Same config and features as ``full_finetune_single_device`` (trainable parts, fp32 masters + bf16
autocast on CUDA, schedule / optimizer / loss components, clipping, accumulation, activation
checkpointing, logging, per-epoch checkpoints with the LLM in HF layout, exact resume), plus:

- **Process group**: backend from the device (NCCL on CUDA, gloo on CPU); nothing calls CUDA
  unless the device is CUDA. Run without torchrun, the recipe forms a world of one process.
- **Meta-device build**: the Llama-3 decoder is built on ``meta`` (no memory), every transformer
  layer and then the model are ``fully_shard``-ed (FSDP2), trainable encoder / connector are
  sharded too, and one full state dict is loaded: rank 0 alone reads the checkpoint files and
  every rank receives its shards (host memory does not grow with the number of ranks).
- **Global-batch loss**: the loss is the sum over each rank's answer tokens divided by the
  all-reduced token count, so N processes with batch B train exactly as one with batch N*B
  (``batch_size`` is per process).
- **Throughput**: ``packed: true`` (with ``max_seq_len``) packs samples and their images into
  rows of ``max_seq_len`` tokens (block-diagonal causal attention, positions restarting per
  sample, the same per-token loss as unpacked; flex attention on CUDA); ``group_by_length: true``
  batches samples of similar length instead; ``compile: true`` compiles each decoder layer (and
  the blocks of trained encoders) with ``torch.compile``, as torchtune does.
- **Checkpoints**: the full state is gathered on rank 0 and written as in the single-device
  recipe; the optimizer state is gathered to full tensors for resume.

The loop is :meth:`FullFinetuneRecipeDistributed.train` below.
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
from medtune.models.medvlm import output_at
from medtune.training import checkpointing as ckpt
from medtune.training import export
from medtune.training.compile import compile_model
from medtune.training.data import build_dataloader
from medtune.training.distributed import (
    all_reduce_sum,
    barrier,
    destroy,
    init_process_group,
    resolve_device,
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
    read_llm_state,
    shard_vlm,
)
from medtune.utils.config import cfg_get, check_keys, optional_component, positive
from medtune.utils.errors import ConfigError, run_entry

SUPPORTS_DISTRIBUTED = True
NAME = "full_finetune_distributed"

KNOWN_KEYS = {
    "output_dir", "assets_dir", "data_dir", "model_dir", "encoder_dir",
    "tokenizer", "model", "checkpointer", "trainable", "llm_dtype", "autocast", "device",
    "dataset", "val_dataset", "prompt_template", "system_prompt", "augment", "blank_images",
    "window", "max_seq_len", "seed", "shuffle", "batch_size", "epochs", "max_steps_per_epoch",
    "gradient_accumulation_steps", "optimizer", "lr", "lr_scheduler", "loss", "clip_grad_norm",
    "enable_activation_checkpointing", "metric_logger", "log_every_n_steps", "num_workers",
    "resume_from_checkpoint", "save_every_n_steps", "packed", "group_by_length", "compile",
}  # fmt: skip


class FullFinetuneRecipeDistributed:
    """Full fine-tuning under FSDP2 (1 or N processes). See the module docstring."""

    def __init__(self, cfg: DictConfig) -> None:
        check_keys(cfg, KNOWN_KEYS, NAME)
        self.cfg = cfg
        self.device = resolve_device(cfg_get(cfg, "device", str, "auto"))
        self.distributed = True  # FSDP2 always; without torchrun a world of one process
        self.rank, self.world_size = init_process_group(self.device)
        self.is_rank_zero = self.rank == 0
        self.output_dir = Path(cfg_get(cfg, "output_dir", str))
        self.llm_dtype = torch.float32  # a trained LLM keeps fp32 masters (llm_dtype is ignored)
        self.autocast = cfg_get(cfg, "autocast", bool, False) and self.device.type == "cuda"
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
        """Build (LLM on ``meta``) -> shard -> load one full state dict -> check."""
        cfg = self.cfg
        model = build_model(cfg.model, device=self.device, dtype=self.llm_dtype, llm_on_meta=True)
        self.is_vlm = is_vlm(model)
        check_llm_mode(model, "full", NAME)
        check_tokenizer(model, self.tokenizer)
        allowed = {"encoder": ("full", "frozen"), "connector": ("full", "frozen"), "llm": ("full",)}
        set_trainable(model, dict(cfg.trainable), allowed=allowed)
        decoder, self.prefix = decoder_of(model)
        if cfg_get(cfg, "enable_activation_checkpointing", bool, False):
            from torchtune.modules import TransformerSelfAttentionLayer

            training.set_activation_checkpointing(
                decoder, auto_wrap_policy={TransformerSelfAttentionLayer}
            )
            for enc in getattr(model, "encoders", {}).values():
                enc.set_grad_checkpointing(True)
        if cfg_get(cfg, "compile", bool, False):  # each decoder layer (+ trained encoder blocks)
            compile_model(model, decoder)
        # one full state dict on rank 0: the LLM (from the resumed checkpoint's llm/ export when
        # resuming) + the trained encoder / connector
        full = read_llm_state(
            self._checkpointer(state), rank=self.rank, only_rank0=True, prefix=self.prefix
        )
        if full is not None:
            full.update(self._trained_start(state))
        shard_vlm(model, decoder)
        load_sharded(model, full, self.device, f"checkpointer ({cfg.checkpointer.checkpoint_dir})")
        check_on_device(model)
        self.trained_names = [clean_name(n) for n, p in model.named_parameters() if p.requires_grad]
        if not self.trained_names:
            raise ConfigError("trainable: nothing to train")
        return model

    def _checkpointer(self, state: dict[str, Any] | None) -> DictConfig:
        """The LLM's checkpointer: the config's, or the resumed checkpoint's ``llm/`` HF export."""
        if state is None:
            return self.cfg.checkpointer
        folder = self.output_dir / state["checkpoint"] / export.LLM_DIR
        return OmegaConf.merge(
            self.cfg.checkpointer,
            {"checkpoint_dir": str(folder), "checkpoint_files": [export.HF_MODEL_FILE]},
        )

    def _trained_start(self, state: dict[str, Any] | None) -> dict[str, torch.Tensor]:
        """Trained encoder / connector of the resumed checkpoint (none for a fresh run)."""
        if state is None:
            return {}
        return ckpt.read_trained(self.output_dir / state["checkpoint"], "resume")

    def _setup_data(self, ds_cfg: DictConfig, train: bool):
        """Reader -> model transform -> dataset -> resumable loader."""
        cfg = self.cfg
        samples = config.instantiate(ds_cfg)
        template = cfg.get("prompt_template")
        transform = (
            medvlm_transform(  # a bare Llama-3: no image tokens, samples must have no images
                self.model,
                self.tokenizer,
                prompt_template=OmegaConf.to_container(template)
                if OmegaConf.is_list(template)
                else template,
                system_prompt=cfg.get("system_prompt"),
                max_seq_len=cfg_get(cfg, "max_seq_len", int, None, check=positive()),
                window=cfg.get("window"),
                blank_images=cfg_get(cfg, "blank_images", bool, False),
                augment=OmegaConf.to_container(cfg.augment)
                if train and cfg.get("augment")
                else None,
                seed=self.seed,
            )
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
        """Write ``output_dir/<tag>/`` (``llm/`` in HF layout, the other trained parts, config) and
        ``output_dir/recipe_state.pt``."""
        full = ckpt.gather_full_state(self.model, self.distributed, self.device)  # collective
        optim = ckpt.optimizer_state(self.model, self.optimizer, self.distributed)  # collective
        rng = ckpt.rng_states()  # collective: every rank's RNGs
        if self.is_rank_zero:
            folder = self.output_dir / tag
            # the LLM goes to llm/ (HF layout); model.safetensors holds the other trained parts
            trained = {
                k: full[k].contiguous()
                for k in self.trained_names
                if not (self.prefix == "" or k.startswith(self.prefix))
            }
            dec = {k[len(self.prefix) :]: v for k, v in full.items() if k.startswith(self.prefix)}
            hf_config = Path(self.cfg.checkpointer.checkpoint_dir) / "config.json"
            export.save_hf(dec, folder / export.LLM_DIR, hf_config)
            out_cfg = OmegaConf.to_container(self.cfg, resolve=True)
            out_cfg["checkpointer"].update(
                checkpoint_dir=str(folder / export.LLM_DIR),
                checkpoint_files=[export.HF_MODEL_FILE],
            )
            ckpt.save_trained(trained, folder, OmegaConf.to_yaml(OmegaConf.create(out_cfg)))
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
        decoder, _ = decoder_of(self.model)
        with (
            torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast),
            output_at(decoder, keep),  # logits only where there is a target
        ):
            if self.is_vlm:
                images = self._batch_images(batch)  # encoder -> [n_img, 3, H, W]
                logits = self.model(
                    tokens, images=images, image_counts=batch["image_counts"], **packing
                )
            else:
                if int(batch["image_counts"].sum()):
                    raise ConfigError(
                        f"dataset: samples {batch['ids']} hold images but the model is a "
                        "text-only Llama-3 (use medtune.data.drop_images, or a MedVLM builder)"
                    )
                logits = self.model(tokens, **packing)
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
    recipe = FullFinetuneRecipeDistributed(cfg)
    recipe.setup()
    recipe.train()
    recipe.cleanup()


if __name__ == "__main__":
    sys.exit(run_entry(NAME, recipe_main))
