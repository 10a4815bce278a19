"""Named MedVLMs whose connector is BLIP-2's Q-Former (:mod:`medtune.models.blip2.connector`).

- :func:`medvlm_msmedcap_blip2_llama3_8b`: MSMedCap stage 2 (SAM + BiomedCLIP, a Q-Former each);
- :func:`medvlm_biomedclip_blip2_llama3_8b`: XrayGPT-style, one encoder;
- :func:`tiny_blip2_medvlm` / :func:`tiny_msmedcap_blip2`: tiny versions for tests.

Moved here from ``medtune/models/blip2_connector.py``. XrayGPT trains only the projection
(``trainable.connector: projection``).
"""

from __future__ import annotations

from medtune.models import llama3 as _llama3
from medtune.models.builders import image_token_id_for_vocab, medvlm, msmedcap_encoders
from medtune.models.encoders import biomedclip_vision, open_clip_vision, tiny_sam_vision


def _connector_kwargs(num_query_tokens: int, sizes: dict | None) -> dict:
    return {"num_query_tokens": num_query_tokens, **(sizes or {})}


def medvlm_msmedcap_blip2_llama3_8b(
    encoder_path: str | None = None,
    sam_checkpoint: str | None = None,
    num_query_tokens: int = 32,
    sam_image_size: int = 1024,
):
    """MSMedCap stage 2: SAM ViT-B (``sam``) and BiomedCLIP (``clip``), each read by its own
    bert-base BLIP-2 Q-Former (32 queries) + a linear map into Llama-3-8B-Instruct (64 image
    tokens per image, SAM's first). Load the two stage-1 runs with ``init_from: {sam: ..., clip: ...}``.
    """
    return medvlm(
        _llama3.llama3_8b(),
        msmedcap_encoders(encoder_path, sam_checkpoint, sam_image_size),
        connector="blip2_qformer",
        connector_kwargs=_connector_kwargs(num_query_tokens, None),
    )


def medvlm_biomedclip_blip2_llama3_8b(encoder_path: str | None = None, num_query_tokens: int = 32):
    """XrayGPT-style: BiomedCLIP patch tokens -> bert-base BLIP-2 Q-Former + linear -> Llama-3-8B
    (the encoder is named ``image``; XrayGPT trains only the projection: ``trainable.connector:
    projection``)."""
    return medvlm(
        _llama3.llama3_8b(),
        biomedclip_vision(encoder_path, output="patch"),
        connector="blip2_qformer",
        connector_kwargs=_connector_kwargs(num_query_tokens, None),
    )


def tiny_blip2_medvlm(
    assets_dir: str, encoder_path: str, num_query_tokens: int = 4, sizes: dict | None = None
):
    """The tiny Llama-3 of the generated assets with any open_clip tower (hub folder) through a
    tiny Q-Former connector (``sizes``: the stage-1 Q-Former's, e.g. the tiny BERT's)."""
    dec = _llama3.llama3_from_hf_config(f"{assets_dir}/llama3_tiny/config.json")
    return medvlm(
        dec,
        open_clip_vision(encoder_path, output="patch"),
        connector="blip2_qformer",
        connector_kwargs=_connector_kwargs(num_query_tokens, sizes),
        image_token_id=image_token_id_for_vocab(dec.tok_embeddings.num_embeddings),
    )


def tiny_msmedcap_blip2(
    assets_dir: str, clip_path: str, num_query_tokens: int = 4, sizes: dict | None = None
):
    """Tiny MSMedCap stage 2: the tiny SAM (``sam``) and an open_clip tower (``clip``), a tiny
    Q-Former connector each, into the tiny Llama-3."""
    dec = _llama3.llama3_from_hf_config(f"{assets_dir}/llama3_tiny/config.json")
    return medvlm(
        dec,
        {"sam": tiny_sam_vision(), "clip": open_clip_vision(clip_path, output="patch")},
        connector="blip2_qformer",
        connector_kwargs=_connector_kwargs(num_query_tokens, sizes),
        image_token_id=image_token_id_for_vocab(dec.tok_embeddings.num_embeddings),
    )
