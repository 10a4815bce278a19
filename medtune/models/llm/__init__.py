"""LLM families behind one protocol: a torchtune decoder + a chat tokenizer.

One module per family, each with its tokenizer, chat format, stop tokens and builders:

========================  =====================================  ==========================
family                    tokenizer ``_component_``               chat format
========================  =====================================  ==========================
``llama3`` (3.0 / 3.1)    ``medtune.models.llama3.llama3_tokenizer``  Llama-3 Instruct headers
``llama2`` (Vicuna)       ``medtune.models.llm.llama2.vicuna_tokenizer``  Vicuna v1.1, MiniGPT-4
``mistral`` (v0.2)        ``medtune.models.llm.mistral.mistral_tokenizer``  ``[INST] ... [/INST]``
``qwen2_5``               ``medtune.models.llm.qwen2_5.qwen2_5_tokenizer``  ChatML
========================  =====================================  ==========================

MedVLM sees only a decoder (embedding ``tok_embeddings``, ``forward(h, mask, input_pos)``, KV
caches: every torchtune ``TransformerDecoder``) and an image placeholder id; the data path sees
only :func:`encode_messages`, :func:`image_token_id`, ``stop_tokens``, ``pad_id`` and ``decode``.
How the placeholder enters each vocabulary is decided in :mod:`medtune.models.llm.placeholder`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from medtune.models.llm.placeholder import FAMILIES, NO_RESERVED_TOKEN_ID, placeholder_id

__all__ = [
    "FAMILIES",
    "NO_RESERVED_TOKEN_ID",
    "decoder_from_hf_config",
    "encode_messages",
    "family_of_hf_config",
    "image_token_id",
    "llm_from_hf_config",
    "placeholder_id",
]


def image_token_id(tokenizer) -> int:
    """The image placeholder id of any medtune tokenizer (or torchtune's ``Llama3Tokenizer``).

    Raises:
        ValueError: the tokenizer has no placeholder (a Llama-3 vocabulary without
            ``<|reserved_special_token_0|>``).
    """
    tid = getattr(tokenizer, "image_token_id", None)
    if tid is not None:
        return int(tid)
    from medtune.models.llama3 import IMAGE_TOKEN

    special = getattr(tokenizer, "special_tokens", None) or {}
    if IMAGE_TOKEN in special:
        return int(special[IMAGE_TOKEN])
    raise ValueError(
        f"{type(tokenizer).__name__}: no image placeholder (expected a medtune tokenizer or a "
        f"Llama-3 tokenizer with {IMAGE_TOKEN})"
    )


def encode_messages(
    tokenizer,
    messages: Sequence[tuple[str, Sequence[str | int]]],
    *,
    add_generation_prompt: bool = False,
    train_on: Sequence[str] = ("assistant",),
) -> tuple[list[int], list[bool]]:
    """Encode chat turns in the tokenizer's own chat format, keeping ``int`` parts as ids.

    Args:
        tokenizer: a family tokenizer of :mod:`medtune.models.llm` or a torchtune Llama-3 one.
        messages: ``(role, parts)``; parts are text or ids (image placeholders).
        add_generation_prompt: end with the open assistant turn.
        train_on: roles whose content and end-of-turn marker are loss targets.

    Returns:
        ``(ids, mask)`` with ``mask[i]`` True where ``ids[i]`` is a loss target.
    """
    if hasattr(tokenizer, "encode_messages"):
        return tokenizer.encode_messages(
            messages, add_generation_prompt=add_generation_prompt, train_on=train_on
        )
    from medtune.models.llama3 import encode_messages as llama3_encode

    return llama3_encode(
        tokenizer, messages, add_generation_prompt=add_generation_prompt, train_on=train_on
    )


def family_of_hf_config(cfg: dict, path: str | Path = "config.json") -> str:
    """The family of an HF ``config.json``: ``model_type`` llama (Llama-3 when its vocabulary
    is Llama-3's layout of >= 128,256 ids or ``rope_theta`` is 500,000; Llama-2 / Vicuna
    otherwise), mistral, qwen2.

    Raises:
        ValueError: another model type (names the file).
    """
    kind = cfg.get("model_type")
    if kind == "llama":
        theta = cfg.get("rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta"))
        big = cfg.get("vocab_size", 0) >= 128_256 or theta == 500_000
        return "llama3" if big else "llama2"
    if kind == "mistral":
        return "mistral"
    if kind == "qwen2":
        return "qwen2_5"
    raise ValueError(
        f"{path}: model_type {kind!r} is not a supported LLM family (llama, mistral, qwen2)"
    )


def decoder_from_hf_config(config_path: str | Path, max_seq_len: int | None = None):
    """Build the torchtune decoder of any supported family shaped by an HF ``config.json``.

    Returns:
        ``(decoder, family)``; weights are loaded by torchtune's checkpointer (``model_type``
        LLAMA3 / LLAMA2 / MISTRAL / QWEN2).
    """
    cfg = json.loads(Path(config_path).read_text())
    family = family_of_hf_config(cfg, config_path)
    if family == "llama3":
        from medtune.models.llama3 import llama3_from_hf_config

        return llama3_from_hf_config(config_path, max_seq_len=max_seq_len), family
    kw = decoder_kwargs(cfg, config_path, max_seq_len)
    if family == "llama2":
        from medtune.models.llm.llama2 import llama2

        return llama2(**kw), family
    if family == "mistral":
        from medtune.models.llm.mistral import mistral

        return mistral(**kw), family
    from medtune.models.llm.qwen2_5 import qwen2

    return qwen2(**kw), family


def llm_from_hf_config(config_path: str | Path, max_seq_len: int | None = None):
    """The decoder alone of :func:`decoder_from_hf_config`: the ``_component_`` of a text-only
    LLM of any family (the local ``vqa_judge``'s ``judge.model``)."""
    return decoder_from_hf_config(config_path, max_seq_len)[0]


def decoder_kwargs(cfg: dict, config_path: str | Path, max_seq_len: int | None = None) -> dict:
    """torchtune decoder-builder arguments (Llama-2 / Mistral / Qwen2 component builders) from an
    HF config dict; Qwen2 adds ``tie_word_embeddings``.

    Raises:
        ValueError: a required key is missing (names ``config_path`` and the key).
    """
    from medtune.models.llama3 import decoder_shape_kwargs

    kw = decoder_shape_kwargs(cfg, config_path, max_seq_len, context=4096, rope_base=10_000)
    if cfg.get("model_type") == "qwen2":
        kw["tie_word_embeddings"] = bool(cfg.get("tie_word_embeddings", False))
    return kw
