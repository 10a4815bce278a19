"""BLIP checkpoints in medtune: every tensor once (the decoder's shared blocks are the encoder's),
buffers (queues, pointer) included, so a resumed run continues bit for bit.

``model.safetensors`` of ``blip_pretrain`` / ``blip_retrieval`` holds :func:`blip_state` (BLIP's
attribute names; the decoder's tied weights appear only under ``text_encoder.*``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def blip_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` of every parameter and persistent buffer, each shared tensor once under
    its first name (``text_encoder.*`` before ``text_decoder.*``), detached on CPU."""
    seen: set[int] = set()
    out = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:
            continue
        seen.add(id(t))
        out[name] = t.detach().cpu().contiguous()
    return out


def blip_shapes(model: nn.Module, buffers: bool = True) -> dict[str, tuple[int, ...]]:
    """Shapes of :func:`blip_state`'s keys (``buffers=False``: parameters only)."""
    seen: set[int] = set()
    params = {id(p) for p in model.parameters()}
    out = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen or (not buffers and id(t) not in params):
            continue
        seen.add(id(t))
        out[name] = tuple(t.shape)
    return out


@torch.no_grad()
def copy_into(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` (keys checked by the caller) into the model's tensors in place."""
    own = model.state_dict(keep_vars=True)
    for k, v in state.items():
        own[k].copy_(v)


def load_blip_state(model: nn.Module, ckpt_dir: str | Path) -> list[str]:
    """Load a ``blip_*`` checkpoint folder (``model.safetensors``) into ``model``, every key and
    shape checked (:func:`medtune.training.checkpointing.check_trained` errors)."""
    from medtune.training.checkpointing import MODEL_FILE, check_trained, read_trained

    from medtune.training.checkpointing import CheckpointMismatchError

    sd = read_trained(ckpt_dir)
    shapes, source = blip_shapes(model), str(Path(ckpt_dir) / MODEL_FILE)
    check_trained(sd, shapes, source, True)
    missing = sorted(set(shapes) - set(sd))
    if missing:
        raise CheckpointMismatchError(
            f"{source}: {len(missing)} tensor(s) of the model are missing, e.g. {missing[:3]} "
            "(a blip_retrieval checkpoint has no text_decoder; start blip_pretrain from it with "
            "init_from, not resume)"
        )
    copy_into(model, sd)
    return list(sd)
