"""MiniGPT-4 / XrayGPT checkpoints into a medtune Q-Former MedVLM (Vicuna LLM).

Names followed: ``xraygpt/models/mini_gpt4.py`` (``MiniGPT4``, the same as MiniGPT-4's
``minigpt4/models/mini_gpt4.py``): ``visual_encoder`` (LAVIS ``eva_vit.py``'s EVA ViT-g, 39
blocks, no final norm), ``ln_vision``, ``Qformer`` (a LAVIS ``BertLMHeadModel`` whose ``cls``,
word / position embeddings and text feed-forward blocks are set to None, so only the query path is
saved), ``query_tokens`` [1, 32, 768], ``llama_proj`` (768 -> 4,096), and ``llama_model`` (Vicuna,
frozen). Their runner saves only parameters that train, so a released checkpoint usually holds
``llama_proj`` alone and MiniGPT-4 takes the Q-Former from a LAVIS BLIP-2 file
(``q_former_model``: ``blip2_pretrained_flant5xxl.pth``) first, the checkpoint second: pass that
file as ``qformer_path`` to do the same.

Into the MedVLM (an encoder named ``encoder``, default ``image``, with a
:class:`medtune.models.blip2.connector.Blip2QFormerConnector`):

================================  ======================================================
MiniGPT-4 / XrayGPT               medtune
================================  ======================================================
``query_tokens``, ``ln_vision.*``  ``connectors.image.query_tokens``, ``.ln_vision.*``
``Qformer.bert.*`` (query path)    ``connectors.image.qformer.*`` (see ``lavis_blip2.qformer_key``)
``llama_proj.*``                   ``connectors.image.proj.*``
``visual_encoder.*``               ``encoders.image.tower.*`` (timm ``eva_giant_patch14_224`` names
                                   are LAVIS's; built with ``depth=39``)
================================  ======================================================

Dropped on purpose: the Q-Former's text parts (``Qformer.cls.*``, word / position embeddings,
``position_ids``, the text ``intermediate`` / ``output`` blocks), which MiniGPT-4 deletes.
Refused: ``llama_model.*`` (the LLM loads through the checkpointer: a checkpoint that carries a
tuned Vicuna is not silently dropped), any other leftover, missing keys (a checkpoint without
``Qformer.*`` and no ``qformer_path`` is refused naming them), and differing shapes. medtune's
timm encoder hands the Q-Former the 256 patch tokens; MiniGPT-4's EVA also passes its CLS token.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from medtune.models.convert import KeyMapError, apply_key_map, read_foreign_checkpoint
from medtune.models.convert.lavis_blip2 import qformer_key

# the text feed-forward block of each layer (MiniGPT-4 sets them to None); the queries' own are
# intermediate_query / output_query
_TEXT_FFN = re.compile(r"^encoder\.layer\.\d+\.(intermediate|output)\.")


def _qformer(k: str) -> str | None:
    if not k.startswith("Qformer.bert."):
        return None
    rest = k.removeprefix("Qformer.bert.")
    if _TEXT_FFN.match(rest):
        return None
    return qformer_key(rest)


def _text_part(k: str) -> bool:
    return k.startswith("Qformer.") and _qformer(k) is None


def minigpt4_state_dict(
    model: torch.nn.Module,
    state: Mapping[str, torch.Tensor],
    *,
    qformer_state: Mapping[str, torch.Tensor] | None = None,
    encoder: str = "image",
    source: str = "MiniGPT-4 checkpoint",
) -> dict[str, torch.Tensor]:
    """Map a MiniGPT-4 / XrayGPT ``model`` dict (over a LAVIS Q-Former dict) onto ``model``.

    Args:
        model: a MedVLM whose connector ``encoder`` is a BLIP-2 Q-Former connector.
        state: the checkpoint's ``model`` dict.
        qformer_state: a LAVIS BLIP-2 ``model`` dict read first (``query_tokens``, ``ln_vision``,
            ``Qformer.*``; its other keys are not used), as MiniGPT-4's ``load_from_pretrained``.
        encoder: the encoder / connector name in the MedVLM.
        source: for messages.

    Returns:
        MedVLM name -> tensor: the whole connector, and the encoder's tower when the checkpoint
        holds ``visual_encoder.*``.

    Raises:
        KeyMapError: leftover, missing or mis-shaped keys, named.
    """
    if encoder not in getattr(model, "connectors", {}):
        raise KeyMapError(f"{source}: the model has no connector named {encoder!r}")
    merged: dict[str, torch.Tensor] = {}
    for k, v in (qformer_state or {}).items():
        if k == "query_tokens" or k.startswith(("ln_vision.", "Qformer.")):
            merged[k] = v
    merged.update(state)
    llm = sorted(k for k in merged if k.startswith("llama_model."))
    if llm:
        raise KeyMapError(
            f"{source}: holds {len(llm)} llama_model.* tensors (e.g. {llm[0]}): load the LLM "
            "through the config's checkpointer (convert a tuned Vicuna to HF layout first)"
        )
    conn, enc = f"connectors.{encoder}.", f"encoders.{encoder}."
    sd = model.state_dict()
    expected = {k: v.shape for k, v in sd.items() if k.startswith(conn)}
    if any(k.startswith("visual_encoder.") for k in merged):
        # the timm tower's fc_norm / head serve pooled output only: MiniGPT-4's EVA has neither
        expected |= {
            k: v.shape
            for k, v in sd.items()
            if k.startswith(enc + "tower.")
            and not k.startswith((enc + "tower.fc_norm.", enc + "tower.head."))
        }

    def rename(k: str) -> str | None:
        if k == "query_tokens" or k.startswith("ln_vision."):
            return conn + k
        if k.startswith("llama_proj."):
            return conn + "proj." + k.removeprefix("llama_proj.")
        if k.startswith("visual_encoder."):
            return enc + "tower." + k.removeprefix("visual_encoder.")
        new = _qformer(k)
        return None if new is None else conn + "qformer." + new

    try:
        return apply_key_map(merged, rename, expected, source=source, ignore=_text_part)
    except KeyMapError as e:
        if not any(k.startswith("Qformer.") for k in merged):
            raise KeyMapError(
                f"{e} (the checkpoint has no Q-Former: pass the LAVIS BLIP-2 file MiniGPT-4 "
                "starts from as qformer_path)"
            ) from None
        raise


def read_minigpt4(
    model: torch.nn.Module, path: str, qformer_path: str | None = None, encoder: str = "image"
) -> dict[str, torch.Tensor]:
    """Read ``path`` (and ``qformer_path``) and map them (:func:`minigpt4_state_dict`)."""
    state = read_foreign_checkpoint(path)
    q = read_foreign_checkpoint(qformer_path) if qformer_path else None
    return minigpt4_state_dict(model, state, qformer_state=q, encoder=encoder, source=str(path))
