"""Full fine-tuning of a MedVLM (or a plain Llama-3) on one device: the LLM's weights all train.

    medtune run full_finetune_single_device --config demo
    medtune run full_finetune_single_device --config demo_text      # text-only Llama-3 SFT
    medtune run full_finetune_single_device --config slake model_dir=... encoder_dir=... data_dir=...

Features (all set in the config):

- **Model**: any ``_component_`` returning a :class:`medtune.models.medvlm.MedVLM` (named builders in
  ``medtune.models.builders``) or a bare Llama-3 ``TransformerDecoder`` (text-only SFT: samples
  without images, e.g. ``medtune.data.sharegpt``). LLM weights load through torchtune's
  checkpointer (HF or Meta layout).
- **Trainable parts**: ``trainable.llm: full``; ``trainable.encoder`` and ``trainable.connector``
  ``full | frozen``. A table of parameter counts per part, then a per-rank memory estimate
  (parameters, gradients, optimizer state by dtype), is printed before training.
- **Precision**: every trained weight is an fp32 master (``llm_dtype`` is ignored for a trained
  LLM); ``autocast: true`` runs compute under bf16 autocast on CUDA.
- **Optimization**: ``optimizer`` (AdamW; bitsandbytes 8-bit AdamW falls back to torch AdamW when
  missing), a learning rate per part (``lr.encoder``, ``lr.connector``, ``lr.llm``), linear
  warm-up + cosine decay, ``clip_grad_norm``, ``gradient_accumulation_steps``,
  ``enable_activation_checkpointing``. The loss is the mean over all answer tokens of the
  (accumulated) batch.
- **Data**: ``dataset`` / ``val_dataset`` (any medtune reader), ``prompt_template``,
  ``system_prompt``, ``augment``, ``blank_images``, ``max_seq_len``. Samples without images
  (``medtune.training.finetune.drop_images`` turns a VQA set into text-only SFT) train a bare
  Llama-3 or a MedVLM (a batch without images skips the encoder; with several processes, mix them
  so that each batch holds images on every rank or on none).
- **Logging**: stdout, ``metric_logger`` (torchtune DiskLogger by default), validation loss per epoch.
- **Checkpoints**: ``output_dir/epoch_{k}/llm/`` (the LLM in HF layout: ``model.safetensors`` +
  ``config.json``, loadable by ``transformers``), ``epoch_{k}/model.safetensors`` (trained encoder
  / connector), ``epoch_{k}/config.yaml`` (its checkpointer points at ``llm/``, so
  ``medtune.models.loading.load_from_checkpoint`` rebuilds the trained model), and
  ``recipe_state.pt``. ``resume_from_checkpoint=True`` continues a killed run and reproduces the
  uninterrupted run's losses.

For several devices use ``full_finetune_distributed``.
"""

from __future__ import annotations

import sys

from omegaconf import DictConfig
from torchtune import config

from medtune.training.finetune import KNOWN_KEYS as _SHARED_KEYS
from medtune.training.finetune import FinetuneRecipe, run

SUPPORTS_DISTRIBUTED = False

KNOWN_KEYS = set(_SHARED_KEYS) - {"save_merged"}  # merged exports are LoRA-only


class FullFinetuneRecipeSingleDevice(FinetuneRecipe):
    """Full fine-tuning on one device. See the module docstring."""

    name = "full_finetune_single_device"
    llm_mode = "full"
    distributed = False
    known_keys = KNOWN_KEYS


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    run(FullFinetuneRecipeSingleDevice, cfg)


if __name__ == "__main__":
    sys.exit(recipe_main())
