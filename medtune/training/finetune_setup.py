"""Set-up shared by the fine-tuning recipes (``vision_finetune``, ``full_finetune``,
``lora_finetune``), as plain functions: the model's build and load around the recipe's own
choices, the data, the optimizer and schedule, the start-up tables.

Moved here from the recipes' ``setup``, ``_setup_model`` and ``_setup_data`` methods, which were
identical in the five recipe files that preceded the three. The model flow is torchtune's
``full_finetune_distributed._setup_model`` (build on ``meta`` -> shard -> load one full state
dict -> check), with litgpt's rule for 1 or N processes (``finetune/lora.py``: FSDP only when
``devices > 1``): one process builds, loads and trains the model unwrapped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torchtune import config, training

from medtune.data.model_transform import VisionChatDataset, medvlm_transform
from medtune.training.compile import compile_model
from medtune.training.data import ResumableSampler, build_dataloader
from medtune.training.memory import estimate_memory, format_memory
from medtune.training.optim import build_lr_scheduler, build_optimizer, param_groups
from medtune.training.params import parameter_table, set_trainable
from medtune.training.run import Run, restore, resume_state
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
    shard_vlm,
)
from medtune.training.trackers import log_resolved_config
from medtune.utils.config import cfg_get, optional_component, positive
from medtune.utils.distributed import shard_module
from medtune.utils.errors import ConfigError


def setup_run(run: Run, setup_model: Callable[[dict[str, Any] | None], nn.Module]) -> None:
    """Fill ``run``: tokenizer, model, loss, logger, data, optimizer, schedule; resume; tables.

    The order is the recipes' ``setup`` as it was (the RNG draws of the model's initialisation
    and of the data come in the same order on 1 and N processes and on resume).

    Args:
        run: the run from :func:`medtune.training.run.start_run`.
        setup_model: the recipe's own model set-up, given the resumed recipe state (or None);
            it may read ``run.tokenizer``.
    """
    cfg = run.cfg
    state = resume_state(run)
    run.tokenizer = config.instantiate(cfg.tokenizer)
    run.model = setup_model(state)
    run.loss_fn = config.instantiate(cfg.loss)
    if run.is_rank_zero and cfg.get("metric_logger"):
        run.metric_logger = config.instantiate(cfg.metric_logger)
        log_resolved_config(run.metric_logger, cfg)  # once, on rank 0 (medtune.training.trackers)
    run.data = setup_data(run, run.model, run.tokenizer)
    run.optimizer, run.lr_scheduler = setup_optimizer(run, run.model, run.data)
    if state is not None:
        restore(run, state)
    print_start(run, run.model, run.optimizer, run.data)


def build_for_training(
    run: Run,
    *,
    mode: str,
    allowed: dict[str, tuple[str, ...]],
    dtype: torch.dtype,
    llm_on_meta: bool = True,
    require_vlm: bool = False,
) -> tuple[nn.Module, nn.Module, str]:
    """Build the config's model and mark what trains, before any weight is loaded.

    Checks that the LLM mode fits the recipe (LoRA layers or none) and that the tokenizer's image
    placeholder is the model's; sets ``trainable`` per part; switches on activation checkpointing
    and ``compile`` when the config asks.

    Args:
        run: the run (its config's ``model``, ``trainable``, ``enable_activation_checkpointing``,
            ``compile``).
        mode: ``"frozen"``, ``"full"`` or ``"lora"``: what the recipe does to the LLM.
        allowed: per part, the ``trainable`` values the recipe accepts.
        dtype: the LLM's parameter dtype (fp32 masters for a trained LLM; a frozen or LoRA base
            may be bf16).
        llm_on_meta: build the decoder on ``meta`` (filled by :func:`load_for_training`); QLoRA
            builds on the device, as torchao cannot quantize on ``meta``.
        require_vlm: refuse a bare Llama-3 right after the build (``vision_finetune``).

    Returns:
        ``(model, decoder, prefix)``: the model, its Llama-3 decoder and the decoder's key prefix.
    """
    cfg = run.cfg
    model = build_model(cfg.model, device=run.device, dtype=dtype, llm_on_meta=llm_on_meta)
    if require_vlm and not is_vlm(model):
        raise ConfigError(
            f"model: {run.name} needs a MedVLM (a builder from medtune.models.builders)"
        )
    check_llm_mode(model, mode, run.name)
    check_tokenizer(model, run.tokenizer)
    set_trainable(model, dict(cfg.trainable), allowed=allowed)
    decoder, prefix = decoder_of(model)
    if cfg_get(cfg, "enable_activation_checkpointing", bool, False):
        from torchtune.modules import TransformerSelfAttentionLayer

        training.set_activation_checkpointing(
            decoder, auto_wrap_policy={TransformerSelfAttentionLayer}
        )
        for enc in getattr(model, "encoders", {}).values():
            enc.set_grad_checkpointing(True)
    if cfg_get(cfg, "compile", bool, False):  # each decoder layer (+ trained encoder blocks)
        compile_model(model, decoder)
    return model, decoder, prefix


def load_for_training(
    run: Run,
    model: nn.Module,
    decoder: nn.Module,
    full: dict[str, torch.Tensor] | None,
    *,
    shard_llm: bool,
) -> list[str]:
    """Wrap (N processes) and fill the model from one full state dict; return what trains.

    - ``shard_llm`` (N processes): every transformer layer, encoder and connector and then the
      model are FSDP2 units; rank 0's ``full`` (None on the other ranks) goes out shard by shard.
    - N processes without ``shard_llm`` (``vision_finetune``'s frozen LLM): every rank loads the
      whole model; the trained encoders / connectors are then sharded, so their gradients are
      averaged across ranks.
    - One process: nothing is wrapped; ``full`` is loaded as is.

    Returns:
        The clean names of the trainable parameters.

    Raises:
        ConfigError: nothing trains.
        UserError: keys or shapes of ``full`` do not fit the model (one line naming the
            checkpointer), or a tensor was never loaded.
    """
    source = f"checkpointer ({run.cfg.checkpointer.checkpoint_dir})"
    if shard_llm:
        shard_vlm(model, decoder)
        load_sharded(model, full, run.device, source)
    else:
        load_unsharded(model, full, run.device, source)
        if run.distributed:  # each rank holds the whole frozen LLM; trained parts are sharded
            for part in (
                *getattr(model, "encoders", {}).values(),
                *getattr(model, "connectors", {}).values(),
            ):
                if any(p.requires_grad for p in part.parameters()):
                    shard_module(part)
    check_on_device(model)
    names = [clean_name(n) for n, p in model.named_parameters() if p.requires_grad]
    if not names:
        raise ConfigError("trainable: nothing to train")
    return names


@dataclass
class Data:
    """The run's datasets and loaders.

    Attributes:
        train_ds: the training dataset (``set_epoch`` re-seeds augmentation and templates).
        train_loader: its resumable loader.
        sampler: its sampler (``set_epoch(epoch, skip=batches_done)``).
        val_loader: the validation loader, or None (``val_dataset: null``).
    """

    train_ds: VisionChatDataset
    train_loader: torch.utils.data.DataLoader
    sampler: ResumableSampler
    val_loader: torch.utils.data.DataLoader | None


def medvlm_loader(run: Run, model: nn.Module, tokenizer: Any, ds_cfg: DictConfig, train: bool):
    """Reader -> model transform -> dataset -> resumable loader (padded, packed or
    length-grouped batches). A bare Llama-3 gets no image tokens: its samples must have none.

    Returns:
        ``(dataset, loader, sampler)``.
    """
    cfg = run.cfg
    samples = config.instantiate(ds_cfg)
    template = cfg.get("prompt_template")
    transform = medvlm_transform(
        model,
        tokenizer,
        prompt_template=OmegaConf.to_container(template)
        if OmegaConf.is_list(template)
        else template,
        system_prompt=cfg.get("system_prompt"),
        max_seq_len=cfg_get(cfg, "max_seq_len", int, None, check=positive()),
        window=cfg.get("window"),
        blank_images=cfg_get(cfg, "blank_images", bool, False),
        augment=OmegaConf.to_container(cfg.augment) if train and cfg.get("augment") else None,
        seed=run.seed,
    )
    ds = VisionChatDataset(samples, transform, train=train)
    return build_dataloader(
        ds,
        batch_size=run.batch_size,
        shuffle=train and cfg_get(cfg, "shuffle", bool, True),
        seed=run.seed,
        rank=run.rank,
        world_size=run.world_size,
        num_workers=cfg_get(cfg, "num_workers", int, 0),
        pad_id=tokenizer.pad_id,
        packed=cfg_get(cfg, "packed", bool, False),
        max_seq_len=cfg_get(cfg, "max_seq_len", int, None),
        group_by_length=train and cfg_get(cfg, "group_by_length", bool, False),
        dense_mask=run.device.type != "cuda",  # CUDA: a flex-attention BlockMask instead
    )


def setup_data(run: Run, model: nn.Module, tokenizer: Any) -> Data:
    """The ``dataset`` loader and, unless ``val_dataset`` is null, the validation loader."""
    train_ds, train_loader, sampler = medvlm_loader(run, model, tokenizer, run.cfg.dataset, True)
    val = optional_component(run.cfg, "val_dataset")  # val_dataset=null switches it off
    val_loader = None if val is None else medvlm_loader(run, model, tokenizer, val, False)[1]
    return Data(train_ds, train_loader, sampler, val_loader)


def setup_optimizer(run: Run, model: nn.Module, data: Data) -> tuple[torch.optim.Optimizer, Any]:
    """Optimizer over per-part parameter groups (``lr.<part>``) and the schedule over every step
    of the run; sets ``run.steps_per_epoch`` (``max_steps_per_epoch`` caps it)."""
    n_batches = len(data.train_loader)
    if run.max_steps_per_epoch is not None:
        n_batches = min(n_batches, run.max_steps_per_epoch * run.accum)
    run.steps_per_epoch = max(1, n_batches // run.accum)
    optimizer = build_optimizer(run.cfg.optimizer, param_groups(model, run.cfg.lr))
    lr_scheduler = build_lr_scheduler(
        run.cfg.get("lr_scheduler"), optimizer, run.steps_per_epoch * run.epochs
    )
    return optimizer, lr_scheduler


def print_start(run: Run, model: nn.Module, optimizer: torch.optim.Optimizer, data: Data) -> None:
    """Rank 0: the parameter table per part, the memory estimate per rank, the run's shape."""
    if not run.is_rank_zero:
        return
    print(parameter_table(model, dict(run.cfg.trainable)), flush=True)
    mem = estimate_memory(model, optimizer, world_size=run.world_size)
    print(format_memory(mem, run.world_size), flush=True)
    print(
        f"{run.name}: {len(data.train_ds)} training samples, {run.steps_per_epoch} steps/epoch "
        f"x {run.epochs} epochs, global batch {run.batch_size * run.world_size * run.accum} "
        f"({run.world_size} process(es), device {run.device})",
        flush=True,
    )
