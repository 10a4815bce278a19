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
  Logits are computed only at the answer positions (:func:`medtune.models.medvlm.output_at`).
- **Data**: ``dataset`` / ``val_dataset`` are any medtune reader (``medtune.data.slake``, ...)
  returning samples; ``prompt_template`` (string or list, sampled per item with ``seed``);
  ``augment`` (opt-in image augmentation); ``blank_images`` (question-only baseline).
- **Logging**: stdout and ``metric_logger`` (torchtune's DiskLogger by default; TensorBoard or W&B
  loggers when installed), validation loss each epoch, tqdm progress.
- **Checkpoints**: ``output_dir/epoch_{k}/model.safetensors`` (trained parts only) +
  ``config.yaml``, and ``output_dir/recipe_state.pt`` (optimizer, scheduler, epoch, data position,
  RNG). ``save_every_n_steps`` adds ``step_{n}/`` folders mid-epoch. ``resume_from_checkpoint=True``
  continues a killed run from the latest state and reproduces the uninterrupted run's losses.
- **Bad input** (a missing or corrupt image, a row without a field, an LLM checkpoint of another
  width, a config key this recipe does not know) stops with one ``vision_finetune: error:`` line
  naming the file, row or key; ``MEDTUNE_TRACEBACK=1`` shows the traceback.
- **Distributed**: under torchrun (``medtune run --nproc_per_node N``): gloo on CPU, NCCL on CUDA;
  the trained parts are FSDP2-sharded (gradients averaged across ranks); ``shard_llm: true``
  also shards the frozen LLM per layer (built on ``meta`` and loaded shard by shard, as in
  ``full_finetune_distributed``), which a 70B LLM needs.

The training loop is :class:`medtune.training.finetune.FinetuneRecipe` (shared with the full and
LoRA recipes) with the LLM frozen; this script sets what differs: the ``trainable`` choices,
``init_from``, ``shard_llm``, and one script for 1 or N processes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn
from torchtune import config

from medtune.training import checkpointing as ckpt
from medtune.training.distributed import is_distributed_env, shard_module
from medtune.training.finetune import KNOWN_KEYS as _SHARED_KEYS
from medtune.training.finetune import FinetuneRecipe, run

SUPPORTS_DISTRIBUTED = True

KNOWN_KEYS = (set(_SHARED_KEYS) - {"save_merged"}) | {"init_from", "shard_llm"}


class VisionFinetuneRecipe(FinetuneRecipe):
    """Train encoder + connector of a MedVLM with a frozen Llama-3. See the module docstring."""

    name = "vision_finetune"
    llm_mode = "frozen"
    vlm_only = True
    known_keys = KNOWN_KEYS

    def __init__(self, cfg: DictConfig) -> None:
        self.distributed = is_distributed_env()  # one script: in-process or under torchrun
        super().__init__(cfg)

    def _shard_llm(self) -> bool:
        return self.distributed and bool(self.cfg.get("shard_llm", False))

    def _wrap_unsharded(self, model: nn.Module) -> None:
        """Without ``shard_llm`` each rank holds the whole frozen LLM; only trained parts are sharded."""
        for part in (*model.encoders.values(), *model.connectors.values()):
            if any(p.requires_grad for p in part.parameters()):
                shard_module(part)

    def _resumed_trained(self) -> dict[str, torch.Tensor]:
        """Trained parts to start from: the resumed checkpoint, else ``init_from`` (e.g. the
        connector of a caption pre-training run), else none."""
        if self._resume_state is not None or not self.cfg.get("init_from"):
            return super()._resumed_trained()
        from safetensors.torch import load_file

        f = Path(self.cfg.init_from) / ckpt.MODEL_FILE
        if not f.is_file():
            raise FileNotFoundError(
                f"init_from: {f} does not exist (expected a medtune checkpoint folder such as "
                "output_dir/epoch_0)"
            )
        return load_file(str(f))


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    run(VisionFinetuneRecipe, cfg)


if __name__ == "__main__":
    sys.exit(recipe_main())
