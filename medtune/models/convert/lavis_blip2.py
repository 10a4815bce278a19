"""LAVIS BLIP-2 stage-1 checkpoints (``blip2_pretrained.pth``) into medtune's Q-Former.

Names followed: LAVIS ``lavis/models/blip2_models/blip2_qformer.py`` (``Blip2Qformer``: ``Qformer``
a ``BertLMHeadModel`` from ``Qformer.py``, ``query_tokens``, ``ln_vision``, ``vision_proj``,
``text_proj``, ``itm_head``, ``temp``) and ``blip2.py`` (``init_Qformer``: cross-attention every
2nd layer, ``intermediate_query`` / ``output_query`` feed-forward for the queries). medtune's
:class:`medtune.models.blip2.qformer.Blip2Qformer` keeps transformers' ``Blip2QFormerModel`` names:

=======================================================  =========================================
LAVIS                                                    medtune
=======================================================  =========================================
``Qformer.bert.embeddings.LayerNorm.*``                  ``qformer.layernorm.*``
``Qformer.bert.embeddings.{word,position}_embeddings``    ``embeddings.{word,position}_embeddings``
``Qformer.bert.encoder.layer.i.attention.self.*``        ``qformer.encoder.layer.i.attention.attention.*``
``Qformer.bert.encoder.layer.i.crossattention.self.*``   ``qformer.encoder.layer.i.crossattention.attention.*``
(other ``Qformer.bert.encoder.*``)                       ``qformer.encoder.*`` (same)
``Qformer.cls.predictions.transform.*``                  ``lm_head.*``
``Qformer.cls.predictions.bias``                         ``lm_bias``
``query_tokens``, ``ln_vision``, ``vision_proj``,        the same
``text_proj``, ``itm_head``, ``temp``
=======================================================  =========================================

Dropped on purpose: ``Qformer.cls.predictions.decoder.*`` (tied to the word embeddings in LAVIS),
``Qformer.bert.embeddings.position_ids`` (a buffer), ``visual_encoder.*`` (the frozen EVA ViT-g:
medtune's stage 1 runs over the encoder its config builds). Refused: anything else, missing
keys, and shapes that differ. The encoder-width tensors (``ln_vision``, cross-attention key /
value: 1,408 wide for EVA ViT-g) fit only an encoder of that width; ``vision_side="skip"`` keeps
medtune's initialisation for them (MSMedCap's encoders are 768 / 256 wide) and loads the rest.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from medtune.models.convert import KeyMapError, apply_key_map, read_foreign_checkpoint


def qformer_key(name: str) -> str | None:
    """A LAVIS ``Qformer.bert.`` key (without that prefix) -> transformers' ``Blip2QFormerModel``
    key, or None for the text embeddings (which stage 2 does not use)."""
    if name.startswith("embeddings.LayerNorm."):
        return "layernorm." + name.removeprefix("embeddings.LayerNorm.")
    if name.startswith("encoder.layer."):
        return name.replace(".attention.self.", ".attention.attention.").replace(
            ".crossattention.self.", ".crossattention.attention."
        )
    return None


def is_vision_width(name: str) -> bool:
    """medtune names whose shape follows the encoder's width (``ln_vision``, cross-attn k/v)."""
    return name.startswith("ln_vision.") or (
        ".crossattention.attention.key." in name or ".crossattention.attention.value." in name
    )


def _rename(k: str) -> str | None:
    if k.startswith("Qformer.bert.embeddings.") and "_embeddings." in k:
        return "embeddings." + k.removeprefix("Qformer.bert.embeddings.")
    if k.startswith("Qformer.bert."):
        new = qformer_key(k.removeprefix("Qformer.bert."))
        return None if new is None else "qformer." + new
    if k.startswith("Qformer.cls.predictions.transform."):
        return "lm_head." + k.removeprefix("Qformer.cls.predictions.transform.")
    if k == "Qformer.cls.predictions.bias":
        return "lm_bias"
    top = ("query_tokens", "ln_vision.", "vision_proj.", "text_proj.", "itm_head.", "temp")
    return k if k.startswith(top) else None


def _ignored(k: str) -> bool:
    # decoder.* is tied to the word embeddings; position_ids is a buffer; the EVA ViT-g is frozen
    # and not part of medtune's stage-1 model
    return (
        k.startswith("Qformer.cls.predictions.decoder.")
        or k.endswith("embeddings.position_ids")
        or k.startswith("visual_encoder.")
    )


def blip2_stage1_state_dict(
    model: torch.nn.Module,
    state: Mapping[str, torch.Tensor],
    *,
    source: str = "LAVIS blip2_pretrained.pth",
    vision_side: str = "load",
) -> dict[str, torch.Tensor]:
    """Map a LAVIS stage-1 state dict onto ``model`` (a medtune ``Blip2Qformer``).

    Args:
        model: the target (its ``state_dict`` gives the names and shapes).
        state: the LAVIS ``model`` dict.
        source: for messages.
        vision_side: ``"load"`` (the encoder-width tensors must fit) or ``"skip"`` (leave them as
            initialised: an encoder of another width).

    Returns:
        medtune name -> tensor (every key of ``model`` except, with ``"skip"``, the width ones).

    Raises:
        KeyMapError: leftover, missing or mis-shaped keys, named.
    """
    if vision_side not in ("load", "skip"):
        raise ValueError(f"vision_side {vision_side!r}: expected 'load' or 'skip'")
    expected = {k: v.shape for k, v in model.state_dict().items()}
    skip = vision_side == "skip"
    if skip:
        expected = {k: s for k, s in expected.items() if not is_vision_width(k)}

    def ignore(k: str) -> bool:
        new = _rename(k)
        return _ignored(k) or (skip and new is not None and is_vision_width(new))

    try:
        return apply_key_map(state, _rename, expected, source=source, ignore=ignore)
    except KeyMapError as e:
        if (
            not skip
            and "has shape" in str(e)
            and any(w in str(e) for w in ("ln_vision", "key.", "value."))
        ):
            raise KeyMapError(
                f"{e} (the checkpoint's Q-Former reads a vision encoder of another width; "
                "vision_side: skip loads everything else)"
            ) from None
        raise


def load_lavis_blip2(
    model: torch.nn.Module, path: str | Path, vision_side: str = "load"
) -> list[str]:
    """Load ``blip2_pretrained.pth`` into ``model`` (a medtune ``Blip2Qformer``) in place.

    Returns:
        The medtune names that were loaded.
    """
    state = read_foreign_checkpoint(path)
    mapped = blip2_stage1_state_dict(model, state, source=str(path), vision_side=vision_side)
    model.load_state_dict(mapped, strict=False)
    return sorted(mapped)
