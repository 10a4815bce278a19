"""medcap's released vision checkpoint (``medcap-rocov2-vqarad-slake/last.pt``) into a MedVLM.

Names followed: medcap's modified torchtune recipes (``recipes/full_finetune_distributed.py`` /
``_single_device.py``) save ``torch.save({'visual': model.visual.state_dict(), 'projector':
model.projector.state_dict()}, 'meta_model_last.pt')`` where ``visual`` is open_clip's BiomedCLIP
visual tower (``hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224``: a ``TimmModel``,
``trunk.*`` + ``head.proj.weight`` to 512-d) and ``projector`` is ``nn.Sequential(Linear(512, 4096),
GELU(), Linear(4096, 4096 * 50))``: the pooled image embedding unfolded into 50 Llama-3 tokens
(``torchtune/modules/transformer.py``: ``image.reshape(bsz, -1, 4096)``).

Into :func:`medtune.models.builders.medvlm_medcap_llama3_8b` (``pooled_unfold`` with
``hidden_dim=4096``, ``num_tokens=50``):

=======================  ==========================================
medcap                   medtune
=======================  ==========================================
``visual/<name>``        ``encoders.image.tower.<name>``
``projector/0.*``        ``connectors.image.proj.0.*``
``projector/2.*``        ``connectors.image.proj.2.*``
=======================  ==========================================

Refused: a file without both ``visual`` and ``projector``, leftover or missing keys, other shapes
(e.g. a projector for another token count). medcap marks image positions with the ordinary token
``①`` (118075); medtune uses its reserved placeholder, so prompts differ in that one id only.
"""

from __future__ import annotations

from pathlib import Path

import torch

from medtune.models.convert import KeyMapError, apply_key_map
from medtune.utils.errors import UserError


def medcap_state_dict(
    model: torch.nn.Module,
    ckpt: dict,
    *,
    encoder: str = "image",
    source: str = "medcap last.pt",
) -> dict[str, torch.Tensor]:
    """Map medcap's ``{'visual': ..., 'projector': ...}`` onto ``model``'s encoder and connector.

    Raises:
        KeyMapError: a missing part, leftover, missing or mis-shaped keys, named.
    """
    if not isinstance(ckpt, dict) or not {"visual", "projector"} <= set(ckpt):
        have = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise KeyMapError(f"{source}: expected a dict with 'visual' and 'projector', got {have}")
    flat = {f"visual/{k}": v for k, v in ckpt["visual"].items()}
    flat |= {f"projector/{k}": v for k, v in ckpt["projector"].items()}
    enc, conn = f"encoders.{encoder}.tower.", f"connectors.{encoder}.proj."
    expected = {k: v.shape for k, v in model.state_dict().items() if k.startswith((enc, conn))}

    def rename(k: str) -> str:
        part, name = k.split("/", 1)
        return (enc if part == "visual" else conn) + name

    return apply_key_map(flat, rename, expected, source=source)


def read_medcap(model: torch.nn.Module, path: str | Path, encoder: str = "image") -> dict:
    """Read medcap's ``last.pt`` (``weights_only=True``) and map it (:func:`medcap_state_dict`)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint file not found")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    return medcap_state_dict(model, ckpt, encoder=encoder, source=str(path))
