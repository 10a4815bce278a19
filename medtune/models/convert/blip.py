"""salesforce/BLIP released checkpoints (``model_base.pth``, ``model_base_retrieval_coco.pth``,
``model_large*.pth``) -> :class:`medtune.models.blip.Blip`.

medtune's BLIP keeps BLIP's attribute names and transformers' ``BlipText*`` layers keep
``med.py``'s, so the map is by name; what it has to know:

- tied weights: BLIP saves each weight that ``tie_encoder_decoder_weights`` shares under both
  names (``text_encoder.encoder.layer.N.crossattention...`` and
  ``text_decoder.bert.encoder.layer.N.crossattention...``; the LM matrix under
  ``text_decoder.cls.predictions.decoder.weight``). Every group of foreign names that lands on one
  medtune tensor must hold equal values (checked) and is loaded once.
- ``*.embeddings.position_ids``: ``med.py``'s persistent ``arange`` buffer; medtune's is not
  saved. Dropped (checked to be the ``arange``).
- the queues (``image_queue``, ``text_queue``; ``idx_queue``): loaded when their shape matches the
  model's ``queue_size``, else dropped, as BLIP's ``load_checkpoint`` drops mis-shaped tensors.
  The pointer (``queue_ptr`` in BLIP_Pretrain, ``ptr_queue`` in BLIP_Retrieval) is not loaded:
  BLIP's retrieval fine-tuning from ``model_base.pth`` starts it at 0 (the names differ).
- ``text_decoder.*`` into a model without a decoder (``blip_retrieval``): dropped, as BLIP_Retrieval
  loads ``model_base.pth`` with ``strict=False``.
- ``visual_encoder(_m).pos_embed`` of another image size (the COCO retrieval model is at 384):
  resized as BLIP's ``interpolate_pos_embed`` (bicubic over the patch grid, [CLS] kept).

Everything else must match by name and shape: leftover, missing and mis-shaped keys are refused by
name (:func:`medtune.models.convert.apply_key_map`).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from medtune.models.convert import KeyMapError, apply_key_map, read_foreign_checkpoint, strip_prefix

QUEUES = ("image_queue", "text_queue", "idx_queue")
POINTERS = ("queue_ptr", "ptr_queue")


def interpolate_pos_embed(pos: torch.Tensor, num_patches: int) -> torch.Tensor:
    """``[1, 1 + n_old, W]`` -> ``[1, 1 + num_patches, W]`` (BLIP ``models/vit.py``
    ``interpolate_pos_embed``: bicubic, ``align_corners=False``, extra tokens kept)."""
    old = int((pos.shape[1] - 1) ** 0.5)
    new = int(num_patches**0.5)
    if old == new:
        return pos
    extra, grid = pos[:, :1], pos[:, 1:]
    grid = grid.reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).flatten(1, 2).to(pos.dtype)
    return torch.cat([extra, grid], dim=1)


def _aliases(model: nn.Module) -> tuple[dict[str, str], dict[str, tuple[int, ...]]]:
    """(every state-dict name -> the canonical name of its tensor, canonical name -> shape)."""
    first: dict[int, str] = {}
    alias, shapes = {}, {}
    for name, t in model.state_dict(keep_vars=True).items():
        canon = first.setdefault(id(t), name)
        alias[name] = canon
        shapes.setdefault(canon, tuple(t.shape))
    return alias, shapes


def blip_key_map(
    state: dict[str, torch.Tensor], model: nn.Module, source: str = "BLIP checkpoint"
) -> dict[str, torch.Tensor]:
    """Map a BLIP state dict onto ``model`` (see the module docstring).

    Args:
        state: BLIP's ``checkpoint["model"]`` (``module.`` prefixes allowed).
        model: the target :class:`~medtune.models.blip.Blip`.
        source: named in errors.

    Returns:
        ``{medtune name: tensor}`` for every parameter of ``model`` and the queues that fit.

    Raises:
        KeyMapError: tied copies that differ, leftover / missing / mis-shaped keys, by name.
    """
    state = strip_prefix(dict(state), "module.")
    alias, shapes = _aliases(model)
    params = {id(p) for p in model.parameters()}
    own = model.state_dict(keep_vars=True)
    has_decoder = getattr(model, "text_decoder", None) is not None
    expected = {alias[n]: shapes[alias[n]] for n, t in own.items() if id(t) in params}
    for q in QUEUES:
        if q in state and q in shapes and tuple(state[q].shape) == shapes[q]:
            expected[q] = shapes[q]
    state = dict(state)
    for key in ("visual_encoder.pos_embed", "visual_encoder_m.pos_embed"):
        if key in state and key in shapes and state[key].shape != torch.Size(shapes[key]):
            state[key] = interpolate_pos_embed(state[key], shapes[key][1] - 1)

    def dropped(k: str) -> bool:
        if k.endswith("embeddings.position_ids"):
            v = state[k].reshape(-1)
            if not torch.equal(v, torch.arange(v.numel(), dtype=v.dtype)):
                raise KeyMapError(f"{source}: {k} is not the position arange BLIP saves")
            return True
        if k in POINTERS or (k in QUEUES and k not in expected):
            return True
        return k.startswith("text_decoder.") and not has_decoder

    groups: dict[str, list[str]] = {}
    for k in state:
        if not dropped(k) and k in alias:
            groups.setdefault(alias[k], []).append(k)
    for names in groups.values():
        ref = state[names[0]]
        for other in names[1:]:
            if state[other].shape != ref.shape or not torch.equal(state[other], ref):
                raise KeyMapError(
                    f"{source}: {other} and {names[0]} are one tied tensor in BLIP but differ here"
                )
    keep = {names[0] for names in groups.values()}
    tied = {n for names in groups.values() for n in names[1:]}
    return apply_key_map(
        {k: v for k, v in state.items() if k not in tied},
        lambda k: alias.get(k) if k in keep else None,
        expected,
        source=source,
        ignore=dropped,
    )


def load_blip_checkpoint(model: nn.Module, path: str | Path) -> list[str]:
    """Read a released BLIP ``.pth`` (``weights_only``; the tensors under ``"model"``), map it with
    :func:`blip_key_map` and copy it into ``model``. Returns the medtune names loaded."""
    from medtune.models.blip.state import copy_into

    state = read_foreign_checkpoint(path)
    out = blip_key_map(state, model, source=f"BLIP {Path(path).name}")
    copy_into(model, out)
    return sorted(out)


def load_blip_init(model: nn.Module, path: str | Path) -> list[str]:
    """``init_from`` of the BLIP recipes: a released BLIP file (``.pth``) or a medtune BLIP
    checkpoint folder (``epoch_k/`` with ``model.safetensors``, BLIP's names), both through
    :func:`blip_key_map` (so a ``blip_pretrain`` checkpoint starts ``blip_retrieval`` without its
    decoder, as ``model_base.pth`` does)."""
    p = Path(path)
    file = p / "model.safetensors" if p.is_dir() else p
    state = read_foreign_checkpoint(file)
    from medtune.models.blip.state import copy_into

    out = blip_key_map(state, model, source=str(file))
    copy_into(model, out)
    return sorted(out)
