"""LoRA, DoRA and QLoRA fine-tuning of a MedVLM (or a plain Llama-3) on one device.

    medtune run lora_finetune_single_device --config demo
    medtune run lora_finetune_single_device --config demo model.use_dora=True        # DoRA
    medtune run lora_finetune_single_device --config demo_qlora                      # NF4 base, width 256
    medtune run lora_finetune_single_device --config slake model_dir=... encoder_dir=... data_dir=...

Features (all set in the config):

- **Model**: a builder from ``medtune.models.lora`` (``tiny_medvlm_lora``,
  ``medvlm_open_clip_lora_llama3``, ``medvlm_biomedclip_lora_llama3_8b``, or the bare
  ``lora_llama3_from_hf_config`` for text-only SFT) with torchtune's LoRA modules:
  ``lora_attn_modules``, ``apply_lora_to_mlp``, ``apply_lora_to_output``, ``lora_rank``,
  ``lora_alpha``, ``lora_dropout``, ``use_dora`` (DoRA), ``quantize_base`` (QLoRA: NF4 base weights
  through torchao; every quantized weight needs a size divisible by 256). Base LLM weights load
  through torchtune's checkpointer.
- **Trainable parts**: ``trainable.llm: lora`` (only ``lora_a``/``lora_b``/``magnitude`` train);
  ``trainable.encoder`` / ``trainable.connector`` ``full | frozen``. Parameter table and per-rank
  memory estimate (NF4 at its real storage size) printed before training.
- **Precision**: adapters, encoder and connector are fp32 masters even when the frozen base is bf16
  (``llm_dtype: bf16``) or NF4; with a bf16 base, compute runs under bf16 autocast (on CPU too, as
  fp32 adapters cannot multiply bf16 activations otherwise); ``autocast: true`` turns it on for an
  fp32 base on CUDA.
- **Optimization, data, logging**: as ``full_finetune_single_device`` (``lr.llm`` is the adapters'
  learning rate).
- **Checkpoints** (``output_dir/epoch_{k}/``): ``model.safetensors`` (adapters + trained encoder /
  connector, MedVLM names), ``adapter/`` (PEFT layout: ``adapter_config.json`` +
  ``adapter_model.safetensors``; ``PeftModel.from_pretrained(LlamaForCausalLM, adapter/)`` gives the
  same logits), with ``save_merged: true`` also ``merged/`` (base + adapters folded, HF layout),
  ``config.yaml``, and ``recipe_state.pt`` for ``resume_from_checkpoint=True``.

For several devices use ``lora_finetune_distributed``.
"""

from __future__ import annotations

import sys

from omegaconf import DictConfig
from torchtune import config

from medtune.training.finetune import KNOWN_KEYS as _SHARED_KEYS
from medtune.training.finetune import FinetuneRecipe, run

SUPPORTS_DISTRIBUTED = False

KNOWN_KEYS = set(_SHARED_KEYS)


class LoRAFinetuneRecipeSingleDevice(FinetuneRecipe):
    """LoRA / DoRA / QLoRA on one device. See the module docstring."""

    name = "lora_finetune_single_device"
    llm_mode = "lora"
    distributed = False
    known_keys = KNOWN_KEYS


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    run(LoRAFinetuneRecipeSingleDevice, cfg)


if __name__ == "__main__":
    sys.exit(recipe_main())
