"""LoRA / DoRA / QLoRA decoders of every LLM family, from an HF ``config.json``.

torchtune's ``lora_llama2`` (Llama-2 / Vicuna: RoPE base fixed at 10,000, as those models),
``lora_mistral`` and ``lora_qwen2`` take the same LoRA arguments as ``lora_llama3``
(:func:`medtune.models.lora.lora_args`), so the LoRA recipes take these through the config alone.
"""

from __future__ import annotations

import json
from pathlib import Path

from torchtune.models.llama2 import lora_llama2
from torchtune.models.mistral import lora_mistral
from torchtune.models.qwen2 import lora_qwen2
from torchtune.modules import TransformerDecoder

from medtune.models.builders import medvlm
from medtune.models.connectors import ConnectorKind
from medtune.models.encoders import open_clip_vision
from medtune.models.llama3 import build_decoder
from medtune.models.llm import family_of_hf_config
from medtune.models.llm.placeholder import placeholder_id
from medtune.models.lora import _takes_lora_args, lora_llama3_from_hf_config
from medtune.models.medvlm import MedVLM


@_takes_lora_args()
def lora_decoder_from_hf_config(
    config_path: str | Path, *, lora: dict, max_seq_len: int | None = None
) -> TransformerDecoder:
    """A LoRA decoder of the family an HF ``config.json`` names, with that config's shape."""
    cfg = json.loads(Path(config_path).read_text())
    family = family_of_hf_config(cfg, config_path)
    if family == "llama3":
        return lora_llama3_from_hf_config(config_path, **lora, max_seq_len=max_seq_len)
    kw = dict(
        vocab_size=cfg["vocab_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=cfg["num_attention_heads"],
        num_kv_heads=cfg.get("num_key_value_heads", cfg["num_attention_heads"]),
        embed_dim=cfg["hidden_size"],
        intermediate_dim=cfg["intermediate_size"],
        max_seq_len=max_seq_len or cfg.get("max_position_embeddings", 4096),
        norm_eps=cfg.get("rms_norm_eps", 1e-5),
    )
    if family == "llama2":
        return build_decoder(lora_llama2, **kw, **lora)
    kw["rope_base"] = cfg.get("rope_theta", 10_000)
    if family == "mistral":
        return build_decoder(lora_mistral, **kw, **lora)
    kw["tie_word_embeddings"] = bool(cfg.get("tie_word_embeddings", False))
    return build_decoder(lora_qwen2, **kw, **lora)


@_takes_lora_args()
def medvlm_open_clip_lora_llm(
    llm_config: str,
    encoder_path: str,
    connector: ConnectorKind = "mlp",
    output: str = "patch",
    connector_kwargs: dict | None = None,
    max_seq_len: int | None = None,
    *,
    lora: dict,
) -> MedVLM:
    """Any open_clip tower + connector + a LoRA decoder of any family (``llm_config``), with the
    family's image placeholder (:mod:`medtune.models.llm.placeholder`)."""
    dec = lora_decoder_from_hf_config(llm_config, **lora, max_seq_len=max_seq_len)
    family = family_of_hf_config(json.loads(Path(llm_config).read_text()), llm_config)
    return medvlm(
        dec,
        open_clip_vision(encoder_path, output=output),
        connector=connector,
        connector_kwargs=connector_kwargs,
        image_token_id=placeholder_id(family, dec.tok_embeddings.num_embeddings),
    )
