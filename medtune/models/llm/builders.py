"""MedVLM builders for every LLM family: plain functions, usable as ``_component_`` in configs.

The decoder is built empty (the recipe loads it through torchtune's checkpointer with the
family's ``model_type``: LLAMA3, LLAMA2, MISTRAL, QWEN2); the placeholder id comes from
:func:`medtune.models.llm.placeholder.placeholder_id`, so a config swaps the LLM by naming another
builder (or another ``config.json``) and the family's tokenizer: nothing in the recipes changes.
"""

from __future__ import annotations

from collections.abc import Callable

from torchtune.modules import TransformerDecoder

from medtune.models.builders import medvlm
from medtune.models.connectors import ConnectorKind
from medtune.models.encoders import biomedclip_vision, open_clip_vision
from medtune.models.llm import decoder_from_hf_config
from medtune.models.llm.llama2 import llama2_7b, vicuna_7b_v0
from medtune.models.llm.mistral import mistral_7b_instruct_v0_2
from medtune.models.llm.placeholder import placeholder_id
from medtune.models.llm.qwen2_5 import qwen2_5_7b_instruct
from medtune.models.medvlm import MedVLM

# family -> its 7B decoder builder
DECODERS_7B: dict[str, Callable[[], TransformerDecoder]] = {
    "llama2": llama2_7b,
    "vicuna_v0": vicuna_7b_v0,
    "mistral": mistral_7b_instruct_v0_2,
    "qwen2_5": qwen2_5_7b_instruct,
}


def family_medvlm(decoder: TransformerDecoder, family: str, encoders, **kwargs) -> MedVLM:
    """:func:`medtune.models.builders.medvlm` with ``family``'s placeholder id."""
    vocab = decoder.tok_embeddings.num_embeddings
    return medvlm(decoder, encoders, image_token_id=placeholder_id(family, vocab), **kwargs)


def medvlm_open_clip_llm(
    llm_config: str,
    encoder_path: str,
    connector: ConnectorKind = "mlp",
    output: str = "patch",
    connector_kwargs: dict | None = None,
    max_seq_len: int | None = None,
) -> MedVLM:
    """Any open_clip tower (hub-layout folder) + the LLM an HF ``config.json`` describes (Llama-3,
    Llama-2 / Vicuna, Mistral or Qwen2.5: :func:`medtune.models.llm.family_of_hf_config`)."""
    dec, family = decoder_from_hf_config(llm_config, max_seq_len=max_seq_len)
    enc = open_clip_vision(encoder_path, output=output)
    return family_medvlm(dec, family, enc, connector=connector, connector_kwargs=connector_kwargs)


def _biomedclip(family: str, encoder_path: str | None, connector: ConnectorKind) -> MedVLM:
    dec = DECODERS_7B[family]()
    enc = biomedclip_vision(encoder_path, output="patch")
    fam = "llama2" if family == "vicuna_v0" else family
    return family_medvlm(dec, fam, enc, connector=connector)


def medvlm_biomedclip_vicuna_7b(
    encoder_path: str | None = None, connector: ConnectorKind = "mlp"
) -> MedVLM:
    """BiomedCLIP patch tokens -> connector -> Vicuna-7B v1.5 / Llama-2-7B (4,096 context)."""
    return _biomedclip("llama2", encoder_path, connector)


def medvlm_biomedclip_mistral_7b(
    encoder_path: str | None = None, connector: ConnectorKind = "mlp"
) -> MedVLM:
    """BiomedCLIP patch tokens -> connector -> Mistral-7B-Instruct-v0.2 (LLaVA-Med v1.5's LLM)."""
    return _biomedclip("mistral", encoder_path, connector)


def medvlm_biomedclip_qwen2_5_7b(
    encoder_path: str | None = None, connector: ConnectorKind = "mlp"
) -> MedVLM:
    """BiomedCLIP patch tokens -> connector -> Qwen2.5-7B-Instruct."""
    return _biomedclip("qwen2_5", encoder_path, connector)


def medvlm_xraygpt_vicuna_7b(
    encoder_checkpoint: str | None = None,
    num_query_tokens: int = 32,
    image_size: int = 224,
) -> MedVLM:
    """XrayGPT / MiniGPT-4: EVA ViT-g (LAVIS ``create_eva_vit_g``: 39 blocks, 1,408 wide, patch 14;
    timm ``eva_giant_patch14_224`` names) -> BLIP-2 Q-Former (bert-base, 32 queries) + linear ->
    Vicuna-7B v0. Start it from a released checkpoint with ``init_from: {kind: minigpt4, path:
    ..., qformer_path: blip2_pretrained_flant5xxl.pth}`` (:mod:`medtune.models.convert.minigpt4`).

    Args:
        encoder_checkpoint: timm-format EVA ViT-g weights; None: as built (the vision side then
            comes from the MiniGPT-4 checkpoint, or stays random on ``meta``).
        num_query_tokens: Q-Former queries (image tokens per image).
        image_size: input size (224).
    """
    from medtune.models.encoders import timm_vision

    enc = timm_vision(
        "eva_giant_patch14_224",
        checkpoint_path=encoder_checkpoint,
        image_size=image_size,
        depth=39,
        mean=[0.48145466, 0.4578275, 0.40821073],
        std=[0.26862954, 0.26130258, 0.27577711],
    )
    return family_medvlm(
        vicuna_7b_v0(),
        "llama2",
        enc,
        connector="blip2_qformer",
        connector_kwargs={"num_query_tokens": num_query_tokens},
    )


def tiny_xraygpt_vicuna(
    llm_config: str, encoder_path: str, num_query_tokens: int = 4, sizes: dict | None = None
) -> MedVLM:
    """A tiny :func:`medvlm_xraygpt_vicuna_7b` for tests: an open_clip tower (hub folder) through
    a BLIP-2 Q-Former connector (``sizes``: ``hidden_size``, ``num_hidden_layers``, ...) into the
    LLM of an HF ``config.json`` (the tiny Vicuna of :mod:`medtune.testing.llm_families`)."""
    dec, family = decoder_from_hf_config(llm_config)
    return family_medvlm(
        dec,
        family,
        open_clip_vision(encoder_path, output="patch"),
        connector="blip2_qformer",
        connector_kwargs={"num_query_tokens": num_query_tokens, **(sizes or {})},
    )
