"""Image towers. Each returns tokens ``[b, n, d]`` and names its image transform.

- :func:`open_clip_vision`: the vision tower of any open_clip model in hub layout
  (``open_clip_config.json`` + ``open_clip_pytorch_model.bin`` / ``open_clip_model.safetensors``),
  from a local folder or, offline, from the HF cache (``hf-hub:org/repo``). Only the visual tower
  is built and only ``visual.*`` weights are read, so BiomedCLIP never needs its PubMedBERT tower.
- :func:`biomedclip_vision`: BiomedCLIP's tower; builds from its published config without files
  (for the ``meta`` device) and loads weights when given the folder.
- :func:`timm_vision`: any timm model (ViT, SAM's image encoder ``samvit_*``), weights from a file.

``output="patch"`` yields the patch tokens (CLS and other prefix tokens dropped); ``"pooled"``
yields one token, the model's pooled (for open_clip: projected) embedding.

``feature_layer`` (patch output of a ViT only) takes the patch tokens of an inner block instead of
the tower's final normalized tokens, indexed as LLaVA / transformers index ``hidden_states``:
``-1`` is the last block's output *before* the final LayerNorm, ``-2`` the block before it
(LLaVA-1.5's choice). None (default) keeps the tokens after the final norm. A MedVLM exports to
transformers' LLaVA exactly only with a ``feature_layer`` (LLaVA selects a hidden state, which
never carries the final norm).
"""

from medtune.models.encoders.base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, VisionEncoder
from medtune.models.encoders.open_clip_towers import (
    BIOMEDCLIP_CONFIG,
    BIOMEDCLIP_REPO,
    biomedclip_vision,
    load_visual_state_dict,
    open_clip_vision,
    read_open_clip_config,
)
from medtune.models.encoders.timm_towers import timm_vision, tiny_sam_vision

__all__ = [
    "BIOMEDCLIP_CONFIG",
    "BIOMEDCLIP_REPO",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "VisionEncoder",
    "biomedclip_vision",
    "load_visual_state_dict",
    "open_clip_vision",
    "read_open_clip_config",
    "timm_vision",
    "tiny_sam_vision",
]
