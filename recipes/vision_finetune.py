"""Vision-only tuning of a MedVLM: train the image encoder and connector, keep Llama-3 frozen.

    medtune run vision_finetune --config slake
    medtune run --nproc_per_node 8 vision_finetune --config slake
    medtune cp vision_finetune/slake my_slake.yaml   # edit, then: medtune run vision_finetune --config my_slake.yaml

Features (all set in the config):

- **Model**: any ``_component_`` that returns a :class:`medtune.models.medvlm.MedVLM` (named
  builders in ``medtune.models.builders``). Llama-3 weights load through torchtune's checkpointer
  (``checkpointer``: HF or Meta layout). ``init_from`` loads trained parts from an earlier medtune
  checkpoint folder (e.g. caption pre-training, then VQA).
- **Trainable parts**: ``trainable.encoder`` ``full | frozen``, ``trainable.connector``
  ``full | frozen``; ``trainable.llm`` must stay ``frozen`` here (use the full/LoRA recipes
  otherwise). A table of parameter counts per part is printed at start-up.
- **Precision**: trained parts keep fp32 master weights; ``llm_dtype: bf16`` holds the frozen LLM in
  bf16; ``autocast: true`` runs compute under bf16 autocast on CUDA.
- **Optimization**: ``optimizer`` (AdamW; ``bitsandbytes.optim.AdamW8bit`` on CUDA falls back to
  torch AdamW when bitsandbytes is missing), a learning rate per part (``lr.encoder``,
  ``lr.connector``), linear warm-up + cosine decay (``warmup_steps``), ``clip_grad_norm``,
  ``gradient_accumulation_steps``, ``enable_activation_checkpointing``. The loss is the mean over
  all answer tokens of the global batch (summed per rank, divided by the all-reduced token count),
  so N processes with batch B give the same loss and update as one process with batch N*B.
- **Data**: ``dataset`` / ``val_dataset`` are any medtune reader (``medtune.data.slake``, ...)
  returning samples; ``prompt_template`` (string or list, sampled per item with ``seed``);
  ``augment`` (opt-in image augmentation); ``blank_images`` (question-only baseline).
- **Logging**: stdout and ``metric_logger`` (torchtune's DiskLogger by default; TensorBoard or W&B
  loggers when installed), validation loss each epoch, tqdm progress.
- **Checkpoints**: ``output_dir/epoch_{k}/model.safetensors`` (trained parts only) +
  ``config.yaml``, and ``output_dir/recipe_state.pt`` (optimizer, scheduler, epoch, data position,
  RNG). ``save_every_n_steps`` adds ``step_{n}/`` folders mid-epoch. ``resume_from_checkpoint=True``
  continues a killed run from the latest state and reproduces the uninterrupted run's losses.
- **Distributed**: under torchrun (``medtune run --nproc_per_node N``): gloo on CPU, NCCL on CUDA;
  the trained parts are FSDP2-sharded (gradients averaged across ranks); ``shard_llm: true``
  also shards the frozen LLM per layer.
"""

from __future__ import annotations

import functools
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, DistributedSampler
from torchtune import config, training
from tqdm import tqdm

from medtune.data.chat import IGNORE_INDEX, VisionChatDataset
from medtune.data.collate import collate_vision_chat
from medtune.models.llama3 import IMAGE_TOKEN, decoder_dtype
from medtune.training import checkpointing as ckpt
from medtune.training.distributed import (
    all_reduce_sum,
    barrier,
    destroy,
    init_distributed,
    resolve_device,
    shard_decoder,
    shard_module,
)
from medtune.training.params import parameter_table, set_trainable

SUPPORTS_DISTRIBUTED = True

KNOWN_KEYS = {
    "output_dir", "assets_dir", "data_dir", "model_dir", "encoder_dir", "tokenizer", "model", "checkpointer",
    "trainable", "init_from", "llm_dtype", "autocast", "device", "dataset", "val_dataset", "prompt_template",
    "system_prompt", "augment", "blank_images", "max_seq_len", "seed", "shuffle", "batch_size", "epochs",
    "max_steps_per_epoch", "gradient_accumulation_steps", "optimizer", "lr", "warmup_steps",
    "clip_grad_norm", "enable_activation_checkpointing", "metric_logger", "log_every_n_steps",
    "num_workers", "resume_from_checkpoint", "save_every_n_steps", "shard_llm", "window",
}


class _SkipSampler(torch.utils.data.Sampler):
    """Yields a base sampler's indices after skipping the first ``skip`` (resume mid-epoch)."""

    def __init__(self, base: DistributedSampler):
        self.base, self.skip = base, 0

    def __iter__(self):
        return iter(list(self.base)[self.skip:])

    def __len__(self) -> int:
        return len(self.base) - self.skip


class VisionFinetuneRecipe:
    """Train encoder + connector of a MedVLM with a frozen Llama-3. See the module docstring."""

    def __init__(self, cfg: DictConfig) -> None:
        unknown = sorted(set(cfg.keys()) - KNOWN_KEYS)
        if unknown:
            raise ValueError(f"config key(s) not known to vision_finetune: {', '.join(unknown)} "
                             f"(known: {', '.join(sorted(KNOWN_KEYS))})")
        self.cfg = cfg
        self.device = resolve_device(cfg.get("device", "auto"))
        self.rank, self.world_size = init_distributed(self.device)
        self.is_rank_zero = self.rank == 0
        self.output_dir = Path(cfg.output_dir)
        self.llm_dtype = decoder_dtype(cfg.get("llm_dtype", "fp32"))
        self.autocast = bool(cfg.get("autocast", False)) and self.device.type == "cuda"
        self.seed = training.set_seed(cfg.get("seed", 0) + 0)  # same seed on every rank: same init
        self.batch_size = int(cfg.batch_size)
        self.epochs = int(cfg.epochs)
        self.accum = int(cfg.get("gradient_accumulation_steps", 1))
        self.max_steps_per_epoch = cfg.get("max_steps_per_epoch")
        self.log_every = int(cfg.get("log_every_n_steps", 1))
        self.save_every = cfg.get("save_every_n_steps")
        self.clip = cfg.get("clip_grad_norm")
        self.epoch, self.global_step, self.batches_done = 0, 0, 0
        self.loss_history: list[float] = []

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.cfg
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.tokenizer = config.instantiate(cfg.tokenizer)
        self.model = self._setup_model()
        self.metric_logger = config.instantiate(cfg.metric_logger) if self.is_rank_zero and cfg.get("metric_logger") else None
        self.train_ds, self.train_loader, self.sampler = self._setup_data(cfg.dataset, train=True)
        self.val_loader = self._setup_data(cfg.val_dataset, train=False)[1] if cfg.get("val_dataset") else None
        n_batches = len(self.train_loader)
        if self.max_steps_per_epoch is not None:
            n_batches = min(n_batches, int(self.max_steps_per_epoch) * self.accum)
        self.steps_per_epoch = max(1, n_batches // self.accum)
        self.total_steps = self.steps_per_epoch * self.epochs
        self.optimizer = self._setup_optimizer()
        self.scheduler = training.lr_schedulers.get_cosine_schedule_with_warmup(
            self.optimizer, num_warmup_steps=int(cfg.get("warmup_steps", 0)), num_training_steps=self.total_steps)
        if cfg.get("resume_from_checkpoint", False):
            self._resume()
        if self.is_rank_zero:
            print(parameter_table(self.model, dict(cfg.trainable)), flush=True)
            print(f"vision_finetune: {len(self.train_ds)} training samples, {self.steps_per_epoch} steps/epoch x "
                  f"{self.epochs} epochs, global batch {self.batch_size * self.world_size * self.accum} "
                  f"({self.world_size} process(es), device {self.device})", flush=True)

    def _setup_model(self):
        cfg = self.cfg
        spec = dict(cfg.trainable)
        with training.set_default_dtype(self.llm_dtype), self.device:
            model = config.instantiate(cfg.model)
        if not hasattr(model, "encoders"):
            raise ValueError("model: vision_finetune needs a MedVLM (a builder from medtune.models.builders)")
        tok_img = self.tokenizer.special_tokens.get(IMAGE_TOKEN)
        if tok_img != model.image_token_id:
            raise ValueError(f"tokenizer's {IMAGE_TOKEN} id is {tok_img} but the model's image_token_id is "
                             f"{model.image_token_id}: tokenizer and model do not belong together")
        state = config.instantiate(cfg.checkpointer).load_checkpoint()["model"]
        missing, unexpected = model.decoder.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"checkpointer: LLM weights do not fit the model's decoder "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        del state
        model.decoder.to(self.llm_dtype)
        model.encoders.float()
        model.connectors.float()
        if cfg.get("init_from"):
            ckpt.load_trained(model, cfg.init_from)
        set_trainable(model, spec, allowed={"encoder": ("full", "frozen"), "connector": ("full", "frozen"),
                                            "llm": ("frozen",)})
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError("trainable: nothing to train (encoder and connector are both frozen)")
        if cfg.get("enable_activation_checkpointing", False):
            from torchtune.modules import TransformerSelfAttentionLayer

            training.set_activation_checkpointing(model.decoder, auto_wrap_policy={TransformerSelfAttentionLayer})
            for enc in model.encoders.values():
                enc.set_grad_checkpointing(True)
        if self.world_size > 1:
            for part in (*model.encoders.values(), *model.connectors.values()):
                if any(p.requires_grad for p in part.parameters()):
                    shard_module(part)
            if cfg.get("shard_llm", False):
                shard_decoder(model.decoder)
        self.trained_names = [n for n, p in model.named_parameters() if p.requires_grad]
        return model

    def _setup_data(self, ds_cfg: DictConfig, train: bool):
        cfg = self.cfg
        samples = config.instantiate(ds_cfg)
        ds = VisionChatDataset(
            samples, self.tokenizer, image_token_id=self.model.image_token_id,
            tokens_per_image=self.model.tokens_per_image, transforms=self.model.image_transforms,
            train=train, augment=OmegaConf.to_container(cfg.augment) if train and cfg.get("augment") else None,
            prompt_template=OmegaConf.to_container(cfg.prompt_template) if OmegaConf.is_list(cfg.get("prompt_template")) else cfg.get("prompt_template"),
            system_prompt=cfg.get("system_prompt"), seed=self.seed, max_seq_len=cfg.get("max_seq_len"),
            blank_images=bool(cfg.get("blank_images", False)), window=cfg.get("window"))
        base = DistributedSampler(ds, num_replicas=self.world_size, rank=self.rank,
                                  shuffle=train and cfg.get("shuffle", True), seed=self.seed, drop_last=False)
        sampler = _SkipSampler(base)
        loader = DataLoader(ds, batch_size=self.batch_size, sampler=sampler, num_workers=int(cfg.get("num_workers", 0)),
                            collate_fn=functools.partial(collate_vision_chat, pad_id=self.tokenizer.pad_id),
                            persistent_workers=False)
        return ds, loader, sampler

    def _setup_optimizer(self) -> torch.optim.Optimizer:
        cfg = self.cfg
        lrs = cfg.get("lr", {})
        groups = []
        for part, module in (("encoder", self.model.encoders), ("connector", self.model.connectors)):
            params = [p for p in module.parameters() if p.requires_grad]
            if params:
                if part not in lrs:
                    raise ValueError(f"lr.{part}: missing learning rate for the trained part '{part}'")
                groups.append({"params": params, "lr": float(lrs[part]), "name": part})
        try:
            return config.instantiate(cfg.optimizer, groups)
        except (ImportError, ModuleNotFoundError) as e:
            opt_cfg = {k: v for k, v in cfg.optimizer.items() if k not in ("_component_", "optim_bits", "is_paged")}
            print(f"optimizer: {cfg.optimizer._component_} unavailable ({e}); falling back to torch.optim.AdamW", flush=True)
            return torch.optim.AdamW(groups, **opt_cfg)

    # ------------------------------------------------------------------ checkpoints
    def _resume(self) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        state = ckpt.load_recipe_state(self.output_dir)
        # weights: load full tensors into the (possibly sharded) params
        from safetensors.torch import load_file

        sd = load_file(str(self.output_dir / state["checkpoint"] / ckpt.MODEL_FILE))
        own = dict(self.model.named_parameters())
        with torch.no_grad():
            for k, v in sd.items():
                p = own[k]
                if hasattr(p, "full_tensor"):
                    from torch.distributed.tensor import distribute_tensor

                    p.copy_(distribute_tensor(v.to(p.dtype), p.device_mesh, p.placements))
                else:
                    p.copy_(v)
        set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.global_step, self.batches_done = state["epoch"], state["global_step"], state["batches_done"]
        self.loss_history = list(state.get("loss_history", []))
        torch.set_rng_state(state["rng"]["torch"])
        if self.is_rank_zero:
            print(f"resumed from {self.output_dir / state['checkpoint']} at epoch {self.epoch}, "
                  f"step {self.global_step} ({self.batches_done} batches into the epoch)", flush=True)

    def save_checkpoint(self, tag: str) -> None:
        """Write ``output_dir/<tag>/`` (trained parts + config) and ``recipe_state.pt``."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        trained = ckpt.trained_state_dict(self.model, self.trained_names)  # collective under FSDP
        optim = get_optimizer_state_dict(self.model, self.optimizer,
                                         options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.is_rank_zero:
            ckpt.save_trained(trained, self.output_dir / tag, OmegaConf.to_yaml(self.cfg, resolve=True))
            ckpt.save_recipe_state(self.output_dir, {
                "checkpoint": tag, "epoch": self.epoch, "global_step": self.global_step,
                "batches_done": self.batches_done, "optimizer": optim, "scheduler": self.scheduler.state_dict(),
                "rng": {"torch": torch.get_rng_state()}, "seed": self.seed, "loss_history": self.loss_history,
            })
            print(f"saved {self.output_dir / tag}", flush=True)
        barrier()

    # ------------------------------------------------------------------ train
    def _loss_sum(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = batch["tokens"].to(self.device)
        labels = batch["labels"].to(self.device)
        images = {k: v.to(self.device) for k, v in batch["images"].items()}
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            logits = self.model(tokens, images=images, image_counts=batch["image_counts"])
        targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], dim=1)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                               reduction="sum")
        return loss, (targets != IGNORE_INDEX).sum()

    def validate(self) -> float:
        self.model.eval()
        tot, n = torch.zeros((), device=self.device), torch.zeros((), device=self.device, dtype=torch.long)
        with torch.no_grad():
            for batch in self.val_loader:
                loss, k = self._loss_sum(batch)
                tot += loss.detach()
                n += k
        self.model.train()
        tot, n = all_reduce_sum(tot), all_reduce_sum(n)
        return float(tot / n.clamp(min=1))

    def train(self) -> None:
        self.model.train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        while self.epoch < self.epochs:
            self.sampler.base.set_epoch(self.epoch)
            self.train_ds.set_epoch(self.epoch)
            self.sampler.skip = self.batches_done * self.batch_size
            n_batches = self.steps_per_epoch * self.accum
            pbar = tqdm(total=self.steps_per_epoch, initial=self.batches_done // self.accum,
                        disable=not self.is_rank_zero, desc=f"epoch {self.epoch}", leave=False)
            run_loss = torch.zeros((), device=self.device)
            run_tok = torch.zeros((), device=self.device, dtype=torch.long)
            t0 = time.perf_counter()
            for batch in self.train_loader:
                if self.batches_done >= n_batches:
                    break
                loss, n_tok = self._loss_sum(batch)
                loss.backward()
                run_loss += loss.detach()
                run_tok += n_tok
                self.batches_done += 1
                if self.batches_done % self.accum:
                    continue
                # mean over the tokens of the global batch; FSDP already averages over ranks
                glob_tok = all_reduce_sum(run_tok.clone())
                glob_loss = all_reduce_sum(run_loss.clone())
                training.scale_grads(self.model, self.world_size / glob_tok.clamp(min=1))
                grad_norm = None
                if self.clip is not None:
                    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm=float(self.clip))
                    grad_norm = ckpt.full_tensor(grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.scheduler.step()
                self.global_step += 1
                step_loss = float(glob_loss / glob_tok.clamp(min=1))
                self.loss_history.append(step_loss)
                if self.global_step % self.log_every == 0 and self.is_rank_zero:
                    dt = time.perf_counter() - t0
                    metrics = {"loss": step_loss, "lr": self.optimizer.param_groups[0]["lr"],
                               "tokens_per_second_per_gpu": float(run_tok) / max(dt, 1e-9)}
                    if grad_norm is not None:
                        metrics["grad_norm"] = float(grad_norm)
                    if self.metric_logger is not None:
                        self.metric_logger.log_dict(metrics, step=self.global_step)
                    pbar.set_postfix(loss=f"{step_loss:.4f}")
                    tqdm.write(f"step {self.global_step} epoch {self.epoch} loss {step_loss:.4f} "
                               f"lr {metrics['lr']:.2e}") if not pbar.disable else None
                pbar.update(1)
                run_loss.zero_()
                run_tok.zero_()
                t0 = time.perf_counter()
                if self.save_every and self.global_step % int(self.save_every) == 0 and self.batches_done < n_batches:
                    self.save_checkpoint(f"step_{self.global_step}")
            pbar.close()
            msg = f"epoch {self.epoch} done: train loss {self.loss_history[-1] if self.loss_history else math.nan:.4f}"
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
    sys.exit(recipe_main())
