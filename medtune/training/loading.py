"""Rebuild a trained MedVLM from a medtune checkpoint folder (``output_dir/epoch_k``).

The folder's ``config.yaml`` (the resolved config of the run) names the tokenizer, the model
builder and the LLM checkpointer; ``model.safetensors`` holds the trained parts. Used by the
``generate``, ``eval`` and ``serve`` recipes and the demo. Building and loading go through the one
loader, :func:`medtune.training.loader.load_model`; this module adds the run's config, the
tokenizer check and the trained parts (``model.safetensors``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from medtune.training.checkpointing import CheckpointMismatchError  # re-exported for callers


def load_from_checkpoint(
    ckpt_dir: str | Path,
    device: str | torch.device = "cpu",
    llm_dtype: str | None = None,
    overrides: dict | None = None,
):
    """Build tokenizer + model from a run's checkpoint folder and load every weight.

    Args:
        ckpt_dir: e.g. ``outputs/run1/epoch_2`` (holds ``config.yaml`` and ``model.safetensors``).
        device: where to put the model.
        llm_dtype: ``fp32 | bf16`` for the LLM (default: the run's ``llm_dtype``).
        overrides: dotted-key overrides of the saved config (e.g. a moved ``model_dir``).

    Returns:
        ``(model, tokenizer, cfg)`` with the model in eval mode.

    Raises:
        FileNotFoundError: no ``config.yaml`` in the folder.
        UserError: the LLM checkpoint does not fit the builder (width, keys, shapes).
        CheckpointMismatchError: tokenizer and model disagree on the image token, or adapters
            are missing.
    """
    from torchtune import config

    from medtune.models.llama3 import IMAGE_TOKEN, decoder_dtype
    from medtune.models.llm import image_token_id
    from medtune.training.checkpointing import load_trained
    from medtune.training.export import is_adapter_key
    from medtune.training.loader import load_model
    from medtune.training.setup import read_llm_state

    ckpt_dir = Path(ckpt_dir)
    cfg_file = ckpt_dir / "config.yaml"
    if not cfg_file.is_file():
        raise FileNotFoundError(
            f"{ckpt_dir}: no config.yaml (expected a medtune checkpoint folder such as "
            "output_dir/epoch_0)"
        )
    cfg: DictConfig = OmegaConf.load(cfg_file)
    for k, v in (overrides or {}).items():
        OmegaConf.update(cfg, k, v, force_add=True)
    dtype = decoder_dtype(llm_dtype or cfg.get("llm_dtype", "fp32"))
    device = torch.device(device)
    tokenizer = config.instantiate(cfg.tokenizer)
    # the one loader: the LLM built on meta, filled from the base checkpoint (LoRA/DoRA adapters
    # are not in it: they come from model.safetensors below), checked
    where = cfg.checkpointer.checkpoint_dir
    model = load_model(
        cfg.model,
        read_llm_state(cfg.checkpointer, prefix="decoder."),
        device=device,
        dtype=dtype,
        source=f"checkpointer ({where})",
    )
    if image_token_id(tokenizer) != getattr(model, "image_token_id", None):
        raise CheckpointMismatchError(
            f"{cfg_file}: tokenizer and model disagree on the {IMAGE_TOKEN} id"
        )
    from medtune.training.setup import state_shapes  # names only: no NF4 dequantizing hook

    adapters = {k for k in state_shapes(model) if k.startswith("decoder.") and is_adapter_key(k)}
    model.decoder.to(dtype)
    model.encoders.float()
    model.connectors.float()
    absent = adapters - set(load_trained(model, ckpt_dir))
    if absent:
        raise CheckpointMismatchError(
            f"{ckpt_dir}: the model has LoRA adapters that model.safetensors lacks, "
            f"e.g. {sorted(absent)[:3]}"
        )
    model.eval()
    return model, tokenizer, cfg
