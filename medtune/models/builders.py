"""Named model builders: plain functions, usable as ``_component_`` in configs.

Full-size builders take the encoder folder (``encoder_path``) and build the Llama-3 decoder
empty; the recipe loads the decoder weights through torchtune's checkpointer. Pass
``encoder_path=None`` to build with random encoder weights (e.g. on the ``meta`` device).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn
from torchtune.modules import TransformerDecoder

from medtune.models import llama3 as _llama3
from medtune.models.connectors import build_connector
from medtune.models.encoders import biomedclip_vision, open_clip_vision
from medtune.models.medvlm import MedVLM

LLAMA3_IMAGE_TOKEN_ID = 128002  # <|reserved_special_token_0|> in Llama-3 and 3.1


def medvlm(
    decoder: TransformerDecoder,
    encoders: dict[str, nn.Module] | nn.Module,
    connector: str | dict[str, str] = "mlp",
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


def _biomedclip_llama(decoder_fn: Callable[[], TransformerDecoder], encoder_path: str | None, output: str,
                      connector: str, connector_kwargs: dict | None) -> MedVLM:
    enc = biomedclip_vision(encoder_path, output=output)
    return medvlm(decoder_fn(), enc, connector=connector, connector_kwargs=connector_kwargs)


def medvlm_biomedclip_llama3_8b(encoder_path: str | None = None, connector: str = "mlp") -> MedVLM:
    """BiomedCLIP patch tokens (196 x 768) -> LLaVA MLP -> Llama-3-8B-Instruct (196 image tokens)."""
    return _biomedclip_llama(_llama3.llama3_8b, encoder_path, "patch", connector, None)


def medvlm_biomedclip_llama3_1_8b(encoder_path: str | None = None, connector: str = "mlp") -> MedVLM:
    """BiomedCLIP patch tokens -> LLaVA MLP -> Llama-3.1-8B-Instruct."""
    return _biomedclip_llama(_llama3.llama3_1_8b, encoder_path, "patch", connector, None)


def medvlm_medcap_llama3_8b(encoder_path: str | None = None, num_tokens: int = 32) -> MedVLM:
    """medcap: BiomedCLIP's pooled 512-d embedding -> ``pooled_unfold`` to 32 tokens -> Llama-3-8B."""
    return _biomedclip_llama(_llama3.llama3_8b, encoder_path, "pooled", "pooled_unfold", {"num_tokens": num_tokens})


def medvlm_open_clip_llama3(llm_config: str, encoder_path: str, connector: str = "mlp", output: str = "patch",
                            connector_kwargs: dict | None = None, max_seq_len: int | None = None) -> MedVLM:
    """Any open_clip tower (hub-layout folder) + a Llama-3 shaped by an HF ``config.json``.

    Works for the tiny test assets and for real downloads alike. The placeholder id follows
    Llama-3's layout: the vocabulary ends with 256 special tokens, ``<|reserved_special_token_0|>``
    being the third (128002 for a 128,256-token vocabulary).
    """
    dec = _llama3.llama3_from_hf_config(llm_config, max_seq_len=max_seq_len)
    enc = open_clip_vision(encoder_path, output=output)
    vocab = dec.tok_embeddings.num_embeddings
    return medvlm(dec, enc, connector=connector, connector_kwargs=connector_kwargs,
                  image_token_id=vocab - 256 + (LLAMA3_IMAGE_TOKEN_ID - 128000))


def tiny_medvlm(assets_dir: str, connector: str = "mlp", output: str = "patch",
                connector_kwargs: dict | None = None) -> MedVLM:
    """The tiny MedVLM of the generated test/demo assets (``medtune.testing.assets``)."""
    return medvlm_open_clip_llama3(f"{assets_dir}/llama3_tiny/config.json", f"{assets_dir}/tiny_clip",
                                   connector=connector, output=output, connector_kwargs=connector_kwargs)
