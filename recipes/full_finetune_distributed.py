"""Full fine-tuning of a MedVLM (or a plain Llama-3) on several devices with FSDP2.

    medtune run --nproc_per_node 2 full_finetune_distributed --config demo              # 2 CPU processes (gloo)
    medtune run --nproc_per_node 8 full_finetune_distributed --config slake model_dir=... encoder_dir=... data_dir=...

Same config and features as ``full_finetune_single_device`` (trainable parts, fp32 masters + bf16
autocast on CUDA, warm-up + cosine, clipping, accumulation, activation checkpointing, logging,
per-epoch checkpoints with the LLM in HF layout, resume), plus:

- **Process group**: backend from the device (NCCL on CUDA, gloo on CPU); nothing calls CUDA
  unless the device is CUDA. Run without torchrun, the recipe forms a world of one process.
- **Meta-device build**: the Llama-3 decoder is built on ``meta`` (no memory), every transformer
  layer and then the decoder are ``fully_shard``-ed (FSDP2, one shard per rank), trainable encoder /
  connector are sharded too, and the LLM weights are loaded shard by shard
  (``torchtune.training.load_from_full_model_state_dict``).
- **Global-batch loss**: the loss is the sum over each rank's answer tokens divided by the
  all-reduced token count, so N processes with batch B train exactly as one with batch N*B
  (``batch_size`` is per process).
- **Checkpoints**: full state gathered on rank 0 (``training.gather_cpu_state_dict``) and written
  as in the single-device recipe; the optimizer state is gathered to full tensors for resume.
- **Memory**: the per-rank estimate printed at start-up counts each rank's shards.
"""

from __future__ import annotations

import sys

from omegaconf import DictConfig
from torchtune import config

from medtune.training.finetune import KNOWN_KEYS as _SHARED_KEYS
from medtune.training.finetune import FinetuneRecipe, run

SUPPORTS_DISTRIBUTED = True

KNOWN_KEYS = set(_SHARED_KEYS) - {"save_merged"}  # merged exports are LoRA-only


class FullFinetuneRecipeDistributed(FinetuneRecipe):
    """Full fine-tuning with FSDP2. See the module docstring."""

    name = "full_finetune_distributed"
    llm_mode = "full"
    distributed = True
    known_keys = KNOWN_KEYS


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    run(FullFinetuneRecipeDistributed, cfg)


if __name__ == "__main__":
    sys.exit(recipe_main())
