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

from medtune.utils.errors import UserError

RECIPE_STATE = "recipe_state.pt"
MODEL_FILE = "model.safetensors"


class CheckpointMismatchError(UserError, ValueError):
    """A checkpoint that does not fit the model (unknown keys, other shapes) or its own config."""


class MissingCheckpointError(UserError, FileNotFoundError):
    """A checkpoint folder without its ``model.safetensors``."""


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
        CheckpointMismatchError: naming ``source`` and the unknown keys or the first mismatched
            shape.
    """
    unknown = [k for k in sd if k not in shapes]
    if unknown and strict_keys:
        raise CheckpointMismatchError(
            f"{source}: {len(unknown)} key(s) not in the model, e.g. {unknown[:3]} "
            "(a checkpoint of another model or connector?)"
        )
    for k, v in sd.items():
        if k in shapes and tuple(v.shape) != shapes[k]:
            raise CheckpointMismatchError(
                f"{source}: '{k}' has shape {tuple(v.shape)}, the model expects {shapes[k]}"
            )


def load_trained(model: nn.Module, ckpt_dir: str | Path, strict_keys: bool = True) -> list[str]:
    """Load a trained-parts checkpoint into ``model`` (before any FSDP wrapping).

    Returns:
        The keys loaded.

    Raises:
        MissingCheckpointError / CheckpointMismatchError / UserError: naming the folder and the
            missing file, the mismatched keys or shapes, or an unreadable file.
    """
    sd = read_trained(ckpt_dir)
    own = dict(model.named_parameters())
    f = str(Path(ckpt_dir) / MODEL_FILE)
    check_trained(sd, {k: tuple(p.shape) for k, p in own.items()}, f, strict_keys)
    with torch.no_grad():
        for k, v in sd.items():
            if k in own:
                own[k].copy_(v)
    return list(sd)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch with ``seed`` (the same on every rank: identical initial
    weights; torchtune's ``set_seed`` adds the rank)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every RNG a training step may draw from: torch (CPU and CUDA), Python, NumPy.

    Stored in the recipe state and restored by :func:`set_rng_state` just before the first
    resumed step, so dropout and anything else drawn in the main process continue exactly where
    the interrupted run was. (Data-side randomness is seeded per item and does not use them.)
    """
    py = random.getstate()
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }


def rng_states() -> list[dict[str, Any]]:
    """:func:`rng_state` of every rank, in rank order (a collective under torchrun).

    Ranks draw different amounts of randomness (dropout over batches of different padded
    lengths), so each rank's state is kept and restored to the same rank.
    """
    import torch.distributed as dist

    mine = rng_state()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [mine]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, mine)
    return out


def set_rng_state(saved: dict[str, Any] | list[dict[str, Any]]) -> None:
    """Restore this rank's entry of :func:`rng_states` (or one :func:`rng_state`).

    Raises:
        UserError: the run is resumed on another number of processes than it was saved on.
    """
    import torch.distributed as dist

    if isinstance(saved, list):
        rank, world = 0, 1
        if dist.is_available() and dist.is_initialized():
            rank, world = dist.get_rank(), dist.get_world_size()
        if len(saved) != world:
            raise UserError(
                f"resume_from_checkpoint: the run was saved by {len(saved)} process(es) and is "
                f"resumed on {world}; resume with --nproc_per_node {len(saved)} (an exact resume "
                "needs every rank's random state)"
            )
        saved = saved[rank]
    state = saved
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "python" in state and isinstance(state["python"], list):
        v, internal, gauss = state["python"]
        random.setstate((v, tuple(internal), gauss))
    if "numpy" in state and isinstance(state["numpy"], list):
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


def gather_full_state(model: nn.Module, distributed: bool, device: torch.device) -> dict:
    """Full CPU state dict of the model (a collective under FSDP2: call on every rank; rank 0
    gets the tensors, NF4 dequantized)."""
    if distributed:
        from torchtune import training

        rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
        return training.gather_cpu_state_dict(model, rank0, device=device)
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, distributed: bool) -> dict:
    """The optimizer's full (unsharded, CPU) state (a collective under FSDP2)."""
    if not distributed:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(model, optimizer, options=opts)


def load_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, distributed: bool
) -> None:
    """Load :func:`optimizer_state`'s output (sharded again under FSDP2)."""
    if not distributed:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    # strict=False: trainable parameters that never get a gradient (e.g. the pooled head of an
    # encoder used for patch tokens) have no AdamW state, in the uninterrupted run either
    opts = StateDictOptions(full_state_dict=True, strict=False)
    set_optimizer_state_dict(model, optimizer, state, options=opts)


def read_trained(ckpt_dir: str | Path, what: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a medtune checkpoint folder's ``model.safetensors``.

    Args:
        ckpt_dir: the checkpoint folder (``output_dir/epoch_0``).
        what: the config key it came from, prefixed to messages (``init_from``).

    Raises:
        MissingCheckpointError: the folder has no ``model.safetensors``.
        UserError: the file is not a safetensors file (truncated, another format).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    prefix = f"{what}: " if what else ""
    f = Path(ckpt_dir) / MODEL_FILE
    if not f.is_file():
        raise MissingCheckpointError(
            f"{prefix}{ckpt_dir}: no {MODEL_FILE} (expected a medtune checkpoint folder such as "
            "output_dir/epoch_0)"
        )
    try:
        return load_file(str(f))
    except SafetensorError as e:  # truncated, or not a safetensors file at all
        raise UserError(f"{prefix}{f} is not a readable safetensors file ({e})") from None


def save_recipe_state(output_dir: Path, state: dict[str, Any]) -> None:
    tmp = output_dir / (RECIPE_STATE + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, output_dir / RECIPE_STATE)


def load_recipe_state(output_dir: Path) -> dict[str, Any]:
    import pickle

    f = Path(output_dir) / RECIPE_STATE
    if not f.is_file():
        raise UserError(f"resume_from_checkpoint=True but {f} does not exist (nothing to resume)")
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, EOFError, RuntimeError) as e:
        raise UserError(f"{f}: not a medtune recipe state ({str(e).splitlines()[0]})") from None
