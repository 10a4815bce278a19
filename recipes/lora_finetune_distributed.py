"""LoRA / DoRA fine-tuning of a MedVLM (or a plain Llama-3) on several devices with FSDP2.

    medtune run --nproc_per_node 2 lora_finetune_distributed --config demo              # 2 CPU processes (gloo)
    medtune run --nproc_per_node 8 lora_finetune_distributed --config slake model_dir=... encoder_dir=... data_dir=...

Same config and features as ``lora_finetune_single_device`` (LoRA/DoRA options, fp32 adapters over
a bf16 base, schedules, clipping, accumulation, activation checkpointing, logging, PEFT adapter
export and optional merged export, resume), plus:

- **Process group**: NCCL on CUDA, gloo on CPU (torchtune's own LoRA recipe hard-codes NCCL);
  no unconditional CUDA call. Without torchrun the recipe forms a world of one process.
- **Meta-device build + FSDP2**: the LoRA decoder is built on ``meta``, sharded per transformer
  layer, and one full state dict (base weights + adapter init from a seeded CPU generator, so any
  number of ranks starts from the same adapters) is loaded shard by shard. QLoRA
  (``quantize_base: true``) builds the decoder on the device instead (torchao cannot quantize on
  ``meta``) and then shards it.
- **Global-batch loss**: N processes with per-process ``batch_size`` B train as one with N*B.
- **Checkpoints**: the full state is gathered on rank 0 (``training.gather_cpu_state_dict``; NF4
  dequantized) for the adapter / merged exports.
"""

from __future__ import annotations

import sys

from omegaconf import DictConfig
from torchtune import config

from medtune.training.finetune import KNOWN_KEYS as _SHARED_KEYS
from medtune.training.finetune import FinetuneRecipe, run

SUPPORTS_DISTRIBUTED = True

KNOWN_KEYS = set(_SHARED_KEYS)


class LoRAFinetuneRecipeDistributed(FinetuneRecipe):
    """LoRA / DoRA with FSDP2. See the module docstring."""

    name = "lora_finetune_distributed"
    llm_mode = "lora"
    distributed = True
    known_keys = KNOWN_KEYS


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    run(LoRAFinetuneRecipeDistributed, cfg)


if __name__ == "__main__":
    sys.exit(recipe_main())
