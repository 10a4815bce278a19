"""Named model builders: plain functions, usable as ``_component_`` in configs.

Connectors by kind: :data:`CONNECTORS` / :func:`build_connector`. BLIP-2 Q-Former MedVLMs:
:mod:`medtune.models.blip2.builders`.

Full-size builders take the encoder folder (``encoder_path``) and build the Llama-3 decoder
empty; the recipe loads the decoder weights through torchtune's checkpointer. Pass
``encoder_path=None`` to build with random encoder weights (e.g. on the ``meta`` device).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn
from torchtune.modules import TransformerDecoder

from medtune.models import llama3 as _llama3
from medtune.models.blip2.connector import Blip2QFormerConnector
from medtune.models.connectors import (
    Connector,
    ConnectorKind,
    LearnedQueryConnector,
    LinearConnector,
    MLPConnector,
    PooledUnfold,
    Resampler,
)
from medtune.models.encoders import (
    biomedclip_vision,
    open_clip_vision,
    timm_vision,
    tiny_sam_vision,
)
from medtune.models.medvlm import MedVLM

LLAMA3_IMAGE_TOKEN_ID = 128002  # <|reserved_special_token_0|> in Llama-3 and 3.1


CONNECTORS: dict[str, type[Connector]] = {
    "linear": LinearConnector,
    "mlp": MLPConnector,
    "pooled_unfold": PooledUnfold,
    "learned_queries": LearnedQueryConnector,
    "resampler": Resampler,
    "blip2_qformer": Blip2QFormerConnector,
}
"""Connector kind -> class (the names of :data:`medtune.models.connectors.ConnectorKind`)."""


def build_connector(kind: str, in_dim: int, out_dim: int, **kwargs) -> Connector:
    """Build a connector by kind (a key of :data:`CONNECTORS`)."""
    if kind not in CONNECTORS:
        raise ValueError(f"unknown connector {kind!r}: expected one of {', '.join(CONNECTORS)}")
    return CONNECTORS[kind](in_dim, out_dim, **kwargs)


def image_token_id_for_vocab(vocab_size: int) -> int:
    """The placeholder id for a Llama-3 embedding table of ``vocab_size`` rows (base ranks + 256
    special tokens): 128002 for the real 128,256-row models, the same offset for tiny ones."""
    return _llama3.special_tokens_for_base_vocab(vocab_size - 256)[_llama3.IMAGE_TOKEN]


def medvlm(
    decoder: TransformerDecoder,
    encoders: dict[str, nn.Module] | nn.Module,
    connector: ConnectorKind | dict[str, ConnectorKind] = "mlp",
    connector_kwargs: dict | None = None,
    image_token_id: int = LLAMA3_IMAGE_TOKEN_ID,
    fuse: str = "sequence",
) -> MedVLM:
    """Compose a MedVLM, sizing the connector(s) from the encoder(s) and the decoder.

    Args:
        decoder: the Llama-3 decoder.
        encoders: one encoder (named ``"image"``) or name -> encoder.
        connector: connector kind for all encoders, or name -> kind.
        connector_kwargs: extra arguments (e.g. ``num_tokens`` for ``pooled_unfold``), for all, or
            name -> kwargs when keyed by encoder names.
        image_token_id: placeholder id (128002 for real Llama-3 tokenizers).
        fuse: ``"sequence"`` (a connector per encoder) or ``"channel"`` (one ``"fused"`` connector).
    """
    if isinstance(encoders, nn.Module):
        encoders = {"image": encoders}
    d = decoder.tok_embeddings.embedding_dim
    kw = connector_kwargs or {}
    if fuse == "channel":
        kind = connector if isinstance(connector, str) else connector["fused"]
        width = sum(e.out_dim for e in encoders.values())
        connectors = {"fused": build_connector(kind, width, d, **kw.get("fused", kw))}
    else:
        connectors = {}
        # kwargs keyed by encoder names (each a dict) apply per encoder; others apply to all
        keyed = bool(kw) and all(k in encoders and isinstance(v, dict) for k, v in kw.items())
        for name, enc in encoders.items():
            kind = connector if isinstance(connector, str) else connector[name]
            args = kw.get(name, {}) if keyed else kw
            connectors[name] = build_connector(kind, enc.out_dim, d, **args)
    return MedVLM(decoder, encoders, connectors, image_token_id=image_token_id, fuse=fuse)


def _biomedclip_llama(
    decoder_fn: Callable[[], TransformerDecoder],
    encoder_path: str | None,
    output: str,
    connector: str,
    connector_kwargs: dict | None,
) -> MedVLM:
    enc = biomedclip_vision(encoder_path, output=output)
    return medvlm(decoder_fn(), enc, connector=connector, connector_kwargs=connector_kwargs)


def medvlm_biomedclip_llama3_8b(
    encoder_path: str | None = None, connector: ConnectorKind = "mlp"
) -> MedVLM:
    """BiomedCLIP patch tokens (196 x 768) -> LLaVA MLP -> Llama-3-8B-Instruct (196 image tokens)."""
    return _biomedclip_llama(_llama3.llama3_8b, encoder_path, "patch", connector, None)


def medvlm_biomedclip_llama3_1_8b(
    encoder_path: str | None = None, connector: ConnectorKind = "mlp"
) -> MedVLM:
    """BiomedCLIP patch tokens -> LLaVA MLP -> Llama-3.1-8B-Instruct."""
    return _biomedclip_llama(_llama3.llama3_1_8b, encoder_path, "patch", connector, None)


def medvlm_medcap_llama3_8b(
    encoder_path: str | None = None, num_tokens: int = 50, hidden_dim: int | None = 4096
) -> MedVLM:
    """medcap: BiomedCLIP's pooled 512-d embedding -> medcap's projector (Linear 512 -> 4096, GELU,
    Linear 4096 -> 50 x 4096) -> 50 tokens into Llama-3-8B, as medcap's released
    ``last.pt`` (``init_from: {kind: medcap, path: .../last.pt}``, :mod:`medtune.models.convert.medcap`).
    ``hidden_dim=None`` gives a single linear map instead."""
    return _biomedclip_llama(
        _llama3.llama3_8b,
        encoder_path,
        "pooled",
        "pooled_unfold",
        {"num_tokens": num_tokens, "hidden_dim": hidden_dim},
    )


def msmedcap_encoders(
    encoder_path: str | None, sam_checkpoint: str | None, sam_image_size: int = 1024
) -> dict[str, nn.Module]:
    """MSMedCap's two towers, SAM's first: ``{"sam": timm samvit_base_patch16, "clip": BiomedCLIP
    patch tokens}`` (see :func:`medvlm_msmedcap_llama3_8b` for the arguments)."""
    sam = timm_vision(
        "samvit_base_patch16", checkpoint_path=sam_checkpoint, image_size=sam_image_size
    )
    return {"sam": sam, "clip": biomedclip_vision(encoder_path, output="patch")}


def medvlm_msmedcap_llama3_8b(
    encoder_path: str | None = None,
    sam_checkpoint: str | None = None,
    num_queries: int = 32,
    sam_image_size: int = 1024,
) -> MedVLM:
    """MSMedCap-style dual encoder: SAM ViT-B (detail) and BiomedCLIP (semantics), each through its
    own BLIP-2 style Q-Former, into Llama-3-8B-Instruct.

    SAM's image encoder is timm's ``samvit_base_patch16`` (89.7M parameters; 1024 px -> a 64 x 64
    map of 256-d neck features = 4,096 tokens); BiomedCLIP gives 196 patch tokens of width 768.
    Each Q-Former reads its encoder's tokens with ``num_queries`` learned queries, so the LLM sees
    ``2 * num_queries`` image tokens per image (SAM's first). Each encoder gets its own image
    transform (1024 px and 224 px).

    Args:
        encoder_path: BiomedCLIP hub-layout folder (or ``hf-hub:`` name in the local cache).
        sam_checkpoint: timm-format SAM ViT-B weights (e.g. ``model.safetensors`` of the HF repo
            ``timm/samvit_base_patch16.sa1b``); None: random init (tests, meta builds).
        num_queries: learned queries per Q-Former.
        sam_image_size: SAM's input size.
    """
    return medvlm(
        _llama3.llama3_8b(),
        msmedcap_encoders(encoder_path, sam_checkpoint, sam_image_size),
        connector="learned_queries",
        connector_kwargs={"num_queries": num_queries},
    )


def medvlm_open_clip_llama3(
    llm_config: str,
    encoder_path: str,
    connector: ConnectorKind = "mlp",
    output: str = "patch",
    connector_kwargs: dict | None = None,
    max_seq_len: int | None = None,
    feature_layer: int | None = None,
) -> MedVLM:
    """Any open_clip tower (hub-layout folder) + a Llama-3 shaped by an HF ``config.json``.

    Works for the tiny test assets and for real downloads alike. The placeholder id follows
    Llama-3's layout: the vocabulary ends with 256 special tokens, ``<|reserved_special_token_0|>``
    being the third (128002 for a 128,256-token vocabulary).
    """
    dec = _llama3.llama3_from_hf_config(llm_config, max_seq_len=max_seq_len)
    return open_clip_medvlm(dec, encoder_path, connector, output, connector_kwargs, feature_layer)


def open_clip_medvlm(
    decoder: TransformerDecoder,
    encoder_path: str,
    connector: ConnectorKind = "mlp",
    output: str = "patch",
    connector_kwargs: dict | None = None,
    feature_layer: int | None = None,
) -> MedVLM:
    """``decoder`` (full or LoRA) + any open_clip tower (hub-layout folder) + a connector, with the
    placeholder id of ``decoder``'s vocabulary (:func:`image_token_id_for_vocab`).
    ``feature_layer``: patch tokens of an inner ViT block (LLaVA-style; needed for an exact
    transformers LLaVA export), see :mod:`medtune.models.encoders`."""
    return medvlm(
        decoder,
        open_clip_vision(encoder_path, output=output, feature_layer=feature_layer),
        connector=connector,
        connector_kwargs=connector_kwargs,
        image_token_id=image_token_id_for_vocab(decoder.tok_embeddings.num_embeddings),
    )


def tiny_medvlm(
    assets_dir: str,
    connector: ConnectorKind = "mlp",
    output: str = "patch",
    connector_kwargs: dict | None = None,
    feature_layer: int | None = None,
) -> MedVLM:
    """The tiny MedVLM of the generated test/demo assets (``medtune.testing.assets``)."""
    return medvlm_open_clip_llama3(
        f"{assets_dir}/llama3_tiny/config.json",
        f"{assets_dir}/tiny_clip",
        connector=connector,
        output=output,
        connector_kwargs=connector_kwargs,
        feature_layer=feature_layer,
    )


def tiny_msmedcap(assets_dir: str, num_queries: int = 4) -> MedVLM:
    """A tiny dual-encoder MedVLM shaped like :func:`medvlm_msmedcap_llama3_8b`: a random 2-block
    SAM-style timm encoder (64 px) and the tiny open_clip tower (32 px), a Q-Former each, into the
    tiny Llama-3 of the generated assets. For tests of several encoders with their own transforms."""
    dec = _llama3.llama3_from_hf_config(f"{assets_dir}/llama3_tiny/config.json")
    sam = tiny_sam_vision(64)
    clip = open_clip_vision(f"{assets_dir}/tiny_clip", output="patch")
    return medvlm(
        dec,
        {"sam": sam, "clip": clip},
        connector="learned_queries",
        connector_kwargs={
            "num_queries": num_queries,
            "hidden_dim": 32,
            "num_layers": 1,
            "num_heads": 2,
        },
        image_token_id=image_token_id_for_vocab(dec.tok_embeddings.num_embeddings),
    )


def tiny_medcap(assets_dir: str, num_tokens: int = 50, hidden_dim: int | None = 32) -> MedVLM:
    """A tiny :func:`medvlm_medcap_llama3_8b`: the tiny open_clip tower's pooled embedding ->
    medcap's projector (Linear -> GELU -> Linear to ``num_tokens`` x the LLM width; 50 tokens as
    medcap's) -> the tiny Llama-3 of the generated assets. Loads a medcap-layout ``last.pt`` at
    tiny size (:func:`medtune.testing.medcap.write_medcap_checkpoint`) through ``init_from: {kind:
    medcap}``."""
    dec = _llama3.llama3_from_hf_config(f"{assets_dir}/llama3_tiny/config.json")
    return open_clip_medvlm(
        dec,
        f"{assets_dir}/tiny_clip",
        "pooled_unfold",
        "pooled",
        {"num_tokens": num_tokens, "hidden_dim": hidden_dim},
    )
