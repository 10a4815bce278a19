"""BLIP checkpoints in medtune: every tensor once (the decoder's shared blocks are the encoder's),
buffers (queues, pointer) included, so a resumed run continues bit for bit.

``model.safetensors`` of ``blip_pretrain`` / ``blip_retrieval`` holds :func:`blip_state` (BLIP's
attribute names; the decoder's tied weights appear only under ``text_encoder.*``); the recipes load
it with :func:`medtune.training.blip_state.load_blip_state`.
"""

from __future__ import annotations

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
