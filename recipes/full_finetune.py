"""Full fine-tuning of a MedVLM (or a plain Llama-3): the LLM's weights all train, on 1..N processes.

    medtune run full_finetune --config demo                               # one process
    medtune run full_finetune --config demo_text                          # text-only Llama-3 SFT
    medtune run --nproc_per_node 2 full_finetune --config demo            # 2 CPU processes (gloo)
    medtune run --nproc_per_node 8 full_finetune --config slake model_dir=... encoder_dir=... data_dir=...
    medtune cp full_finetune my_full.py   # the recipe itself: edit its loop, then
    medtune run my_full.py --config full_finetune/demo

``full_finetune_single_device`` and ``full_finetune_distributed`` are aliases of this recipe
(their configs are this recipe's: ``full_finetune_single_device --config slake`` runs
``full_finetune/slake_single_device``).

Features (all set in the config):

- **Model**: any ``_component_`` returning a :class:`medtune.models.medvlm.MedVLM` (named builders in
  ``medtune.models.builders``) or a bare Llama-3 ``TransformerDecoder`` (text-only SFT: samples
  without images, e.g. ``medtune.data.drop_images`` over a VQA reader). LLM weights load through
  torchtune's checkpointer (HF or Meta layout) into a decoder built on ``meta``.
- **Trainable parts**: ``trainable.llm: full``; ``trainable.encoder`` and ``trainable.connector``
  ``full | frozen``. A table of parameter counts per part, then a memory estimate per rank
  (parameters, gradients, optimizer state by dtype), is printed before training.
- **Precision**: every trained weight is an fp32 master (``llm_dtype`` is ignored for a trained
  LLM); ``autocast: true`` runs compute under bf16 autocast on CUDA.
- **Optimization**: ``optimizer``, ``lr_scheduler`` and ``loss`` are components (AdamW;
  bitsandbytes 8-bit AdamW falls back to torch AdamW when missing; warm-up + cosine), a learning
  rate per part (``lr.encoder``, ``lr.connector``, ``lr.llm``), ``clip_grad_norm``,
  ``gradient_accumulation_steps``, ``enable_activation_checkpointing``. The loss is the mean over
  all answer tokens of the global batch (summed per rank, divided by the all-reduced token
  count), so N processes with batch B train exactly as one with batch N*B (``batch_size`` is per
  process). Logits are computed only at the answer positions.
- **Data**: as ``vision_finetune`` (reader -> model transform -> resumable loader); a batch without
  images skips the encoders.
- **Throughput**: ``packed: true`` (with ``max_seq_len``) packs samples and their images into
  rows of ``max_seq_len`` tokens (block-diagonal causal attention, the same per-token loss as
  unpacked; flex attention on CUDA); ``group_by_length: true`` batches samples of similar length
  instead; ``compile: true`` compiles each decoder layer (and trained encoder blocks).
- **1 or N processes**: one process builds the decoder on ``meta``, loads the checkpoint into it
  and trains it unwrapped. Under torchrun (NCCL on CUDA, gloo on CPU) every transformer layer,
  encoder, connector and then the model are ``fully_shard``-ed (FSDP2) and one full state dict is
  loaded: rank 0 alone reads the checkpoint files and every rank receives its shards (host
  memory does not grow with the number of ranks). An 8B LLM with fp32 masters + AdamW needs
  about 128 GB: shard it over several GPUs, or use ``lora_finetune``.
- **Logging**: stdout and ``metric_logger`` (torchtune's DiskLogger by default), validation loss
  each epoch; curves in ``output_dir/plots/*.png`` redrawn after each epoch
  (:func:`medtune.viz.curves.plot_run`).
- **Checkpoints**: ``output_dir/epoch_{k}/llm/`` (the LLM in HF layout: ``model.safetensors`` +
  ``config.json``, loadable by ``transformers``), ``epoch_{k}/model.safetensors`` (trained encoder
  / connector), ``epoch_{k}/config.yaml`` (its checkpointer points at ``llm/``, so ``generate`` and
  ``eval`` rebuild the trained model), and ``recipe_state.pt``. ``save_every_n_steps`` adds
  ``step_{n}/`` folders. ``resume_from_checkpoint=True`` continues a killed run and reproduces the
  uninterrupted run bit for bit.
- **Bad input** stops with one ``full_finetune: error:`` line naming the file, row or key.

The loop is :meth:`FullFinetuneRecipe.train` below; its pieces are plain functions in
:mod:`medtune.training.loop`, the set-up in :mod:`medtune.training.finetune_setup` and
:mod:`medtune.training.run`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torchtune import config

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
NAME = "full_finetune"

KNOWN_KEYS = FINETUNE_KEYS


class FullFinetuneRecipe:
    """Full fine-tuning on 1 (unwrapped) or N (FSDP2) processes. See the module docstring."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.run = start_run(cfg, NAME, KNOWN_KEYS)  # device, processes, loop settings, seed
        self.autocast = cfg_get(cfg, "autocast", bool, False) and self.run.device.type == "cuda"

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        """Tokenizer, model (:meth:`_setup_model`), data, optimizer; resume; start-up tables."""
        setup_run(self.run, self._setup_model)

    def _loss_step(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed loss over the batch's answer tokens, and their count: ``(loss_sum [], n [])``."""
        logits, targets, keep = answer_logits(self.run, batch, self.autocast)
        return self.run.loss_fn(logits, targets[keep]), keep.sum()

    def _setup_model(self, state: dict[str, Any] | None) -> torch.nn.Module:
        """Build (LLM on ``meta``) -> shard (N processes) -> load one full state dict -> check."""
        dtype = torch.float32  # a trained LLM keeps fp32 masters (llm_dtype is ignored)
        allowed = {"encoder": ("full", "frozen"), "connector": ("full", "frozen"), "llm": ("full",)}
        model, decoder, self.prefix = build_for_training(
            self.run, mode="full", allowed=allowed, dtype=dtype
        )
        # one full state dict (on rank 0 when sharded): the LLM (from the resumed checkpoint's
        # llm/ export when resuming) + the trained encoder / connector
        full = read_llm_state(
            self._checkpointer(state),
            rank=self.run.rank,
            only_rank0=self.run.distributed,
            prefix=self.prefix,
        )
        if full is not None and state is not None:
            full.update(ckpt.read_trained(self.run.output_dir / state["checkpoint"], "resume"))
        self.trained_names = load_for_training(
            self.run, model, decoder, full, shard_llm=self.run.distributed
        )
        return model

    def save_checkpoint(self, tag: str) -> None:
        """Write ``output_dir/<tag>/`` (``llm/`` in HF layout, the other trained parts, config) and
        ``output_dir/recipe_state.pt``."""
        save_run(self.run, tag, self._write)

    def _checkpointer(self, state: dict[str, Any] | None) -> DictConfig:
        """The LLM's checkpointer: the config's, or the resumed checkpoint's ``llm/`` HF export."""
        if state is None:
            return self.cfg.checkpointer
        folder = self.run.output_dir / state["checkpoint"] / export.LLM_DIR
        return OmegaConf.merge(
            self.cfg.checkpointer,
            {"checkpoint_dir": str(folder), "checkpoint_files": [export.HF_MODEL_FILE]},
        )

    # ------------------------------------------------------------------ train
    def train(self) -> None:
        # every micro-batch of every epoch from the saved position on; between them
        # (medtune.training.loop.train_batches): mid-epoch checkpoints, and at each epoch's end
        # validation, the epoch checkpoint and the curves (plot_run, rank 0)
        for batch in train_batches(self.run, self._loss_step, self.save_checkpoint, plot_run):
            loss, n_tok = self._loss_step(batch)
            backward_and_step(self.run, loss, n_tok)  # the update once accumulation is complete

    def _write(self, full: dict[str, torch.Tensor], folder: Path) -> None:
        """The LLM to ``llm/`` (HF layout); ``model.safetensors`` holds the other trained parts;
        ``config.yaml``'s checkpointer points at ``llm/``."""
        dec = {k[len(self.prefix) :]: v for k, v in full.items() if k.startswith(self.prefix)}
        hf_config = Path(self.cfg.checkpointer.checkpoint_dir) / "config.json"
        export.save_hf(dec, folder / export.LLM_DIR, hf_config)
        trained = {
            k: full[k].contiguous()
            for k in self.trained_names
            if not (self.prefix == "" or k.startswith(self.prefix))
        }
        llm = {
            "checkpoint_dir": str(folder / export.LLM_DIR),
            "checkpoint_files": [export.HF_MODEL_FILE],
        }
        ckpt.save_trained(trained, folder, config_yaml(self.run, checkpointer=llm))

    def cleanup(self) -> None:
        """Close the logger and the process group."""
        finish(self.run)


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    recipe = FullFinetuneRecipe(cfg)
    recipe.setup()
    recipe.train()
    recipe.cleanup()


if __name__ == "__main__":
    sys.exit(run_entry(NAME, recipe_main))
