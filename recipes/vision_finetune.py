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
  merged by configuration), or ``{kind: minigpt4 | medcap, path: ...}``: another project's
  released weights through its key map (:mod:`medtune.models.convert.init`).
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
  each epoch, tqdm progress (``TQDM_DISABLE=1`` hides it); curves in ``output_dir/plots/*.png``
  redrawn after each epoch (:func:`medtune.viz.curves.plot_run`).
- **Checkpoints**: ``output_dir/epoch_{k}/model.safetensors`` (trained parts only) + ``config.yaml``,
  and ``output_dir/recipe_state.pt`` (optimizer, schedule, epoch, data position, every RNG).
  ``save_every_n_steps`` adds ``step_{n}/`` folders mid-epoch. ``resume_from_checkpoint=True``
  continues a killed run from the latest state and reproduces the uninterrupted run bit for bit
  (augmentation, dropout, shuffling, sampled templates and DataLoader workers included).
- **Bad input** (a missing or corrupt image, a row without a field, an LLM checkpoint of another
  width, a config key this recipe does not know) stops with one ``vision_finetune: error:`` line
  naming the file, row or key; ``MEDTUNE_TRACEBACK=1`` shows the traceback.
- **1 or N processes**: one process wraps nothing. Under torchrun (``medtune run
  --nproc_per_node N``): gloo on CPU, NCCL on CUDA; the trained parts are FSDP2-sharded
  (gradients averaged across ranks); ``shard_llm: true`` also shards the frozen LLM per layer: it
  is built on ``meta``, rank 0 alone reads the checkpoint and every rank receives its shards (a
  70B LLM needs this).

The loop is :meth:`VisionFinetuneRecipe.train` below: edit it in a copy (``medtune cp``). What the
three fine-tuning recipes (``vision_finetune``, ``full_finetune``, ``lora_finetune``) share are
plain functions in ``medtune.training``: the run and its resume (:mod:`medtune.training.run`),
the set-up (:mod:`medtune.training.finetune_setup`), the loop's pieces
(:mod:`medtune.training.loop`).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torchtune import config

from medtune.models.llama3 import decoder_dtype
from medtune.training import checkpointing as ckpt
from medtune.training.finetune_setup import build_for_training, load_for_training, setup_run
from medtune.training.loop import answer_logits, backward_and_step, train_batches
from medtune.training.run import FINETUNE_KEYS, config_yaml, finish, save_run, start_run
from medtune.training.setup import read_llm_state
from medtune.utils.config import cfg_get
from medtune.utils.errors import run_entry
from medtune.viz.curves import plot_run

SUPPORTS_DISTRIBUTED = True
NAME = "vision_finetune"

KNOWN_KEYS = FINETUNE_KEYS | {"init_from", "shard_llm"}


class VisionFinetuneRecipe:
    """Train encoder + connector of a MedVLM with a frozen Llama-3. See the module docstring."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.run = start_run(cfg, NAME, KNOWN_KEYS)  # device, processes, loop settings, seed

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        """Tokenizer, model (:meth:`_setup_model`), data, optimizer; resume; start-up tables."""
        self.shard_llm = self.run.distributed and cfg_get(self.cfg, "shard_llm", bool, False)
        self.autocast = (
            cfg_get(self.cfg, "autocast", bool, False) and self.run.device.type == "cuda"
        )
        setup_run(self.run, self._setup_model)

    def _loss_step(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed loss over the batch's answer tokens, and their count: ``(loss_sum [], n [])``."""
        logits, targets, keep = answer_logits(self.run, batch, self.autocast)
        return self.run.loss_fn(logits, targets[keep]), keep.sum()

    def _setup_model(self, state: dict[str, Any] | None) -> torch.nn.Module:
        """Build (LLM on ``meta``) -> shard -> load one full state dict -> check."""
        allowed = {
            "encoder": ("full", "frozen"),
            "connector": ("full", "frozen", "projection"),  # projection: XrayGPT's variant
            "llm": ("frozen",),
        }
        # the LLM on meta whether sharded or not: no random init of weights that are loaded next,
        # and the same RNG draws (encoder / connector init) on 1 and N processes
        model, decoder, prefix = build_for_training(
            self.run,
            mode="frozen",
            allowed=allowed,
            dtype=decoder_dtype(self.cfg.get("llm_dtype", "fp32")),
            require_vlm=True,
        )
        # one full state dict: the LLM's weights (rank 0 only when sharded) + the trained parts
        # of the resumed checkpoint or of init_from
        full = read_llm_state(
            self.cfg.checkpointer, rank=self.run.rank, only_rank0=self.shard_llm, prefix=prefix
        )
        start = self._trained_start(model, state)
        if full is not None:
            full.update(start)
        trained = load_for_training(self.run, model, decoder, full, shard_llm=self.shard_llm)
        # checkpoints hold what trains plus what init_from gave (a frozen stage-1 Q-Former), so
        # that each checkpoint folder rebuilds the model on its own
        self.saved_names = sorted(set(trained) | set(start))
        return model

    def save_checkpoint(self, tag: str) -> None:
        """Write ``output_dir/<tag>/`` (trained parts + config) and ``output_dir/recipe_state.pt``."""
        save_run(self.run, tag, self._write)

    def _trained_start(self, model: torch.nn.Module, state: dict[str, Any] | None) -> dict:
        """Tensors to start from: the resumed checkpoint, else ``init_from`` (a medtune checkpoint
        folder, or a mapping encoder -> ``qformer_pretrain`` checkpoint folder: MSMedCap's "train
        each Q-Former separately, then merge"), else none."""
        if state is not None:
            return ckpt.read_trained(self.run.output_dir / state["checkpoint"], "resume")
        init = self.cfg.get("init_from")
        if OmegaConf.is_dict(init) and "kind" in init:  # another project's released weights
            from medtune.models.convert.init import foreign_state_dict

            return foreign_state_dict(model, OmegaConf.to_container(init, resolve=True))
        if OmegaConf.is_dict(init):
            from medtune.training.stage1 import stage1_state_dict

            return stage1_state_dict(model, OmegaConf.to_container(init, resolve=True))
        if init:
            return ckpt.read_trained(init, "init_from")
        return {}

    # ------------------------------------------------------------------ train
    def train(self) -> None:
        # every micro-batch of every epoch from the saved position on; between them
        # (medtune.training.loop.train_batches): mid-epoch checkpoints, and at each epoch's end
        # validation, the epoch checkpoint and the curves (plot_run, rank 0)
        for batch in train_batches(self.run, self._loss_step, self.save_checkpoint, plot_run):
            loss, n_tok = self._loss_step(batch)
            backward_and_step(self.run, loss, n_tok)  # the update once accumulation is complete

    def _write(self, full: dict[str, torch.Tensor], folder: Path) -> None:
        """The trained parts (and what ``init_from`` gave) and the config."""
        saved = {k: full[k].contiguous() for k in self.saved_names}
        ckpt.save_trained(saved, folder, config_yaml(self.run))

    def cleanup(self) -> None:
        """Close the logger and the process group."""
        finish(self.run)


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    recipe = VisionFinetuneRecipe(cfg)
    recipe.setup()
    recipe.train()
    recipe.cleanup()


if __name__ == "__main__":
    sys.exit(run_entry(NAME, recipe_main))
