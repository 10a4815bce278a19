"""LoRA, DoRA and QLoRA fine-tuning of a MedVLM (or a plain Llama-3), on 1..N processes.

    medtune run lora_finetune --config demo
    medtune run --nproc_per_node 2 lora_finetune --config demo         # 2 CPU processes (gloo)
    medtune run lora_finetune --config demo model.use_dora=True        # DoRA
    medtune run lora_finetune --config demo_qlora                      # NF4 base, width 256
    medtune run lora_finetune --config demo_text                       # text-only Llama-3 SFT
    medtune run --nproc_per_node 8 lora_finetune --config slake model_dir=... encoder_dir=... data_dir=...
    medtune cp lora_finetune my_lora.py   # the recipe itself: edit its loop, then run the copy:
    medtune run my_lora.py --config lora_finetune/demo

The names of the two recipes this one replaced still run it: ``medtune run
lora_finetune_single_device --config slake`` prints that it runs ``lora_finetune`` with
``lora_finetune/slake_single_device``; ``lora_finetune_distributed`` takes the same configs.

Features (all set in the config):

- **Model**: a builder from ``medtune.models.lora`` (``tiny_medvlm_lora``,
  ``medvlm_open_clip_lora_llama3``, ``medvlm_biomedclip_lora_llama3_8b``, or the bare
  ``lora_llama3_from_hf_config`` for text-only SFT) with torchtune's LoRA modules:
  ``lora_attn_modules``, ``apply_lora_to_mlp``, ``apply_lora_to_output``, ``lora_rank``,
  ``lora_alpha``, ``lora_dropout``, ``use_dora`` (DoRA), ``quantize_base`` (QLoRA: NF4 base weights
  through torchao; every quantized weight needs a size divisible by 256). Base LLM weights load
  through torchtune's checkpointer into a decoder built on ``meta`` (no random init of 8B weights).
- **Trainable parts**: ``trainable.llm: lora`` (only ``lora_a``/``lora_b``/``magnitude`` train);
  ``trainable.encoder`` / ``trainable.connector`` ``full | frozen``. Parameter table and per-rank
  memory estimate (NF4 at its real storage size) printed before training.
- **Precision**: adapters, encoder and connector are fp32 masters even when the frozen base is bf16
  (``llm_dtype: bf16``) or NF4; with a bf16 base, compute runs under bf16 autocast (on CPU too, as
  fp32 adapters cannot multiply bf16 activations otherwise); ``autocast: true`` turns it on for an
  fp32 base on CUDA.
- **Optimization**: ``optimizer``, ``lr_scheduler`` and ``loss`` are components; a learning rate per
  part (``lr.llm`` is the adapters'), ``clip_grad_norm``, ``gradient_accumulation_steps``,
  ``enable_activation_checkpointing``. The loss is the mean over all answer tokens of the global
  batch, so N processes with batch B train as one with batch N*B. Logits are computed only at the
  answer positions.
- **Data**: as ``vision_finetune`` (reader -> model transform -> resumable loader), ``packed``,
  ``group_by_length`` and ``compile`` included.
- **1 or N processes**: one process loads the base into the decoder and trains it unwrapped (a
  QLoRA model on one GPU keeps the single-device memory: no FSDP). Under torchrun the LoRA
  decoder is built on ``meta``, sharded per transformer layer (FSDP2), and one full state dict
  (base weights + adapter init from a seeded CPU generator, so any number of ranks starts from
  the same adapters) is loaded: rank 0 alone reads the checkpoint and every rank receives its
  shards. QLoRA builds the decoder on the device instead (torchao cannot quantize on ``meta``);
  NF4 weights stay whole on every rank. NCCL on CUDA, gloo on CPU.
- **Logging**: stdout, ``metric_logger``, validation loss each epoch; curves in
  ``output_dir/plots/*.png`` redrawn after each epoch (:func:`medtune.viz.curves.plot_run`).
- **Checkpoints** (``output_dir/epoch_{k}/``): ``model.safetensors`` (adapters + trained encoder /
  connector, MedVLM names), ``adapter/`` (PEFT layout: ``adapter_config.json`` +
  ``adapter_model.safetensors``; see README for loading it with ``peft``), with
  ``save_merged: true`` also ``merged/`` (base + adapters folded, HF layout), ``config.yaml``, and
  ``recipe_state.pt`` for ``resume_from_checkpoint=True``, which reproduces the uninterrupted run
  bit for bit (dropout included).
- **Bad input** stops with one ``lora_finetune: error:`` line naming the file, row or key;
  ``MEDTUNE_TRACEBACK=1`` shows the traceback.

The loop is :meth:`LoRAFinetuneRecipe.train` below: edit it in a copy (``medtune cp``). Its pieces
are plain functions in :mod:`medtune.training.loop`; the set-up is in
:mod:`medtune.training.finetune_setup` and :mod:`medtune.training.run`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torchtune import config

from medtune.models.llama3 import decoder_dtype
from medtune.models.lora import adapter_init_state, lora_settings
from medtune.training import checkpointing as ckpt
from medtune.training import export
from medtune.training.finetune_setup import build_for_training, load_for_training, setup_run
from medtune.training.loop import answer_logits, backward_and_step, train_batches
from medtune.training.run import FINETUNE_KEYS, config_yaml, finish, save_run, start_run
from medtune.training.setup import read_llm_state
from medtune.utils.config import cfg_get
from medtune.utils.errors import run_entry
from medtune.viz.curves import plot_run

SUPPORTS_DISTRIBUTED = True
NAME = "lora_finetune"

KNOWN_KEYS = FINETUNE_KEYS | {"save_merged"}


class LoRAFinetuneRecipe:
    """LoRA / DoRA / QLoRA on 1 (unwrapped) or N (FSDP2) processes. See the module docstring."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.run = start_run(cfg, NAME, KNOWN_KEYS)  # device, processes, loop settings, seed
        self.llm_dtype = decoder_dtype(cfg.get("llm_dtype", "fp32"))  # the frozen base's dtype
        # fp32 adapters over a bf16 base need autocast (on CPU too)
        self.autocast = (
            cfg_get(cfg, "autocast", bool, False) and self.run.device.type == "cuda"
        ) or self.llm_dtype != torch.float32

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        """Tokenizer, model (:meth:`_setup_model`), data, optimizer; resume; start-up tables."""
        self.quantized = cfg_get(self.cfg, "model.quantize_base", bool, False)  # QLoRA
        setup_run(self.run, self._setup_model)

    def _loss_step(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed loss over the batch's answer tokens, and their count: ``(loss_sum [], n [])``."""
        logits, targets, keep = answer_logits(self.run, batch, self.autocast)
        return self.run.loss_fn(logits, targets[keep]), keep.sum()

    def _setup_model(self, state: dict[str, Any] | None) -> torch.nn.Module:
        """Build (LLM on ``meta``; QLoRA on the device) -> shard (N processes) -> load one full
        state dict (base + adapters + trained parts) -> check."""
        allowed = {"encoder": ("full", "frozen"), "connector": ("full", "frozen"), "llm": ("lora",)}
        # torchao cannot quantize on meta: a QLoRA decoder is built on the device
        model, decoder, self.prefix = build_for_training(
            self.run,
            mode="lora",
            allowed=allowed,
            dtype=self.llm_dtype,
            llm_on_meta=not self.quantized,
        )
        # one full state dict (on rank 0 when sharded): base weights + (resumed, else initial)
        # adapters and trained parts
        full = read_llm_state(
            self.cfg.checkpointer,
            rank=self.run.rank,
            only_rank0=self.run.distributed,
            prefix=self.prefix,
        )
        if full is not None:
            full.update(self._adapter_start(decoder, full, state))
        self.trained_names = load_for_training(
            self.run, model, decoder, full, shard_llm=self.run.distributed
        )
        return model

    def save_checkpoint(self, tag: str) -> None:
        """Write ``output_dir/<tag>/`` (adapters + trained parts, PEFT adapter, optional merged
        model, config) and ``output_dir/recipe_state.pt``."""
        save_run(self.run, tag, self._write)

    def _adapter_start(
        self, decoder: torch.nn.Module, base: dict[str, torch.Tensor], state: dict[str, Any] | None
    ) -> dict[str, torch.Tensor]:
        """Adapters and trained parts to start from: the resumed checkpoint's, else initial
        adapters drawn from a seeded CPU generator (the same on any number of ranks)."""
        start = {}
        if state is not None:
            start = ckpt.read_trained(self.run.output_dir / state["checkpoint"], "resume")
        if not any(export.is_adapter_key(k) for k in start):
            plain = {k[len(self.prefix) :]: v for k, v in base.items()}
            init = adapter_init_state(decoder, plain, self.run.seed)
            start.update({self.prefix + k: v for k, v in init.items()})
        return start

    # ------------------------------------------------------------------ train
    def train(self) -> None:
        # every micro-batch of every epoch from the saved position on; between them
        # (medtune.training.loop.train_batches): mid-epoch checkpoints, and at each epoch's end
        # validation, the epoch checkpoint and the curves (plot_run, rank 0)
        for batch in train_batches(self.run, self._loss_step, self.save_checkpoint, plot_run):
            loss, n_tok = self._loss_step(batch)
            backward_and_step(self.run, loss, n_tok)  # the update once accumulation is complete

    def _write(self, full: dict[str, torch.Tensor], folder: Path) -> None:
        """``model.safetensors`` (what trains), ``adapter/`` (PEFT), ``merged/`` on request."""
        settings = lora_settings(self.run.model)
        trained = {k: full[k].contiguous() for k in self.trained_names}
        ckpt.save_trained(trained, folder, config_yaml(self.run))
        dec = {k[len(self.prefix) :]: v for k, v in full.items() if k.startswith(self.prefix)}
        hf_config = Path(self.cfg.checkpointer.checkpoint_dir) / "config.json"
        base_model = str(self.cfg.checkpointer.checkpoint_dir)
        export.save_peft_adapter(
            dec, settings, folder / export.ADAPTER_DIR, hf_config, base_model=base_model
        )
        if cfg_get(self.cfg, "save_merged", bool, False):
            export.save_hf(export.merge_lora(dec, settings), folder / export.MERGED_DIR, hf_config)

    def cleanup(self) -> None:
        """Close the logger and the process group."""
        finish(self.run)


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    recipe = LoRAFinetuneRecipe(cfg)
    recipe.setup()
    recipe.train()
    recipe.cleanup()


if __name__ == "__main__":
    sys.exit(run_entry(NAME, recipe_main))
