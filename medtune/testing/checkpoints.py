"""A checkpoint folder as the training recipes write it, without training: for tests of the
recipes that read checkpoints (eval, generate, serve), which need one, not a trained one.

``untrained_checkpoint(config, out, assets_dir=...)`` writes ``out/epoch_0/`` with the resolved
``config.yaml`` and ``model.safetensors`` holding every tensor outside the LLM (encoders and
connectors: what ``vision_finetune`` trains) at their seeded initial values; the LLM comes from
the config's ``checkpointer`` when the checkpoint is loaded, as for a real run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torchtune import config as tt_config

from medtune.training.checkpointing import save_trained


def untrained_checkpoint(config: str | Path, out: str | Path, seed: int = 0, **values: Any) -> Path:
    """Write ``out/epoch_0`` for the training config ``config`` with ``values`` set in it.

    Args:
        config: a training recipe's YAML (e.g. ``recipes/configs/vision_finetune/demo.yaml``).
        out: the run folder (``output_dir``) to write into.
        seed: torch seed for the model's initial weights.
        **values: dotted keys to set (``assets_dir=...``, ``checkpointer.checkpoint_dir=...``).

    Returns:
        The checkpoint folder ``out/epoch_0``.
    """
    cfg = OmegaConf.load(config)
    cfg.output_dir = str(out)
    for key, value in values.items():
        OmegaConf.update(cfg, key, value, force_add=True)
    torch.manual_seed(seed)
    model = tt_config.instantiate(cfg.model)
    trained = {k: v for k, v in model.state_dict().items() if not k.startswith("decoder.")}
    ckpt = Path(out) / "epoch_0"
    save_trained(trained, ckpt, OmegaConf.to_yaml(cfg, resolve=True))
    return ckpt
