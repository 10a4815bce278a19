"""Checkpoints of the trained parts (safetensors) and the recipe state (resume).

Layout in ``output_dir``::

    epoch_{k}/ or step_{n}/
        model.safetensors     trained parameters only, full (unsharded) tensors, MedVLM key names
        config.yaml           the resolved config of the run
    recipe_state.pt           latest only: optimizer, scheduler, epoch, step, data position, RNG,
                              and the name of the checkpoint folder it belongs to

``recipe_state.pt`` holds only tensors, numbers, strings and containers, and is read with
``torch.load(weights_only=True)``. It is written to a temporary file and renamed, so a run killed
while saving leaves the previous state intact.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

RECIPE_STATE = "recipe_state.pt"
MODEL_FILE = "model.safetensors"


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """Gather a DTensor (FSDP2 shard) into a full tensor; plain tensors pass through."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def trained_state_dict(model: nn.Module, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Full CPU copies of the trainable parameters (gathers FSDP2 shards: call on every rank)."""
    out = {}
    for n, p in model.named_parameters():
        if (names is None and p.requires_grad) or (names is not None and n in names):
            out[n] = full_tensor(p.detach()).to("cpu", copy=True).contiguous()
    return out


def save_trained(
    state: dict[str, torch.Tensor], ckpt_dir: Path, config_yaml: str | None = None
) -> Path:
    """Write ``model.safetensors`` (+ ``config.yaml``) into ``ckpt_dir``."""
    from safetensors.torch import save_file

    ckpt_dir.mkdir(parents=True, exist_ok=True)
    tmp = ckpt_dir / (MODEL_FILE + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt", "producer": "medtune"})
    os.replace(tmp, ckpt_dir / MODEL_FILE)
    if config_yaml is not None:
        (ckpt_dir / "config.yaml").write_text(config_yaml)
    return ckpt_dir / MODEL_FILE


def check_trained(
    sd: dict[str, torch.Tensor],
    shapes: dict[str, tuple[int, ...]],
    source: str,
    strict_keys: bool = True,
) -> None:
    """Trained tensors must name parameters of the model, in its shapes.

    Args:
        sd: name -> tensor, as saved.
        shapes: the model's parameter name -> shape.
        source: what ``sd`` came from, for the message.
        strict_keys: names the model lacks are an error (else they are left for the caller to skip).

    Raises:
        ValueError: naming ``source`` and the unknown keys or the first mismatched shape.
    """
    unknown = [k for k in sd if k not in shapes]
    if unknown and strict_keys:
        raise ValueError(
            f"{source}: {len(unknown)} key(s) not in the model, e.g. {unknown[:3]} "
            "(a checkpoint of another model or connector?)"
        )
    for k, v in sd.items():
        if k in shapes and tuple(v.shape) != shapes[k]:
            raise ValueError(
                f"{source}: '{k}' has shape {tuple(v.shape)}, the model expects {shapes[k]}"
            )


def load_trained(model: nn.Module, ckpt_dir: str | Path, strict_keys: bool = True) -> list[str]:
    """Load a trained-parts checkpoint into ``model`` (before any FSDP wrapping).

    Returns:
        The keys loaded.

    Raises:
        FileNotFoundError / ValueError: naming the folder and the mismatched keys or shapes.
    """
    from safetensors.torch import load_file

    f = Path(ckpt_dir) / MODEL_FILE
    if not f.is_file():
        raise FileNotFoundError(
            f"{ckpt_dir}: no {MODEL_FILE} (expected a medtune checkpoint folder such as epoch_0/)"
        )
    sd = load_file(str(f))
    own = dict(model.named_parameters())
    check_trained(sd, {k: tuple(p.shape) for k, p in own.items()}, str(f), strict_keys)
    with torch.no_grad():
        for k, v in sd.items():
            if k in own:
                own[k].copy_(v)
    return list(sd)


def rng_state() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "python": repr(random.getstate()),
        "numpy": repr(
            np.random.get_state()[1].tolist()[:8]
        ),  # informative; numpy is reseeded from torch
    }


def save_recipe_state(output_dir: Path, state: dict[str, Any]) -> None:
    tmp = output_dir / (RECIPE_STATE + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, output_dir / RECIPE_STATE)


def load_recipe_state(output_dir: Path) -> dict[str, Any]:
    f = Path(output_dir) / RECIPE_STATE
    if not f.is_file():
        raise FileNotFoundError(
            f"resume_from_checkpoint=True but {f} does not exist (nothing to resume)"
        )
    return torch.load(f, map_location="cpu", weights_only=True)
