"""The one place that decides which id marks an image position in a prompt, for every LLM family.

The rule:

1. A family whose released vocabulary reserves a special token that text can never produce uses
   it. Only Llama-3 / 3.1 qualifies: ``<|reserved_special_token_0|>`` (id 128002), kept so that
   every Llama-3 MedVLM checkpoint written so far reloads unchanged
   (:data:`medtune.models.llama3.IMAGE_TOKEN`; torchtune's tiktoken wrapper encodes the
   special-token *text* as plain text, so a question containing that string cannot forge it).
2. Every other family (Llama-2 / Vicuna, Mistral, Qwen2.5) uses :data:`NO_RESERVED_TOKEN_ID`,
   ``-200``: LLaVA's ``IMAGE_TOKEN_INDEX`` convention. Qwen2.5 does have ``<|image_pad|>``, but its
   tokenizer turns that *text* inside a question into the special id, so a user could forge image
   positions; a negative id cannot be produced by any tokenizer.

Why a negative id works without touching the vocabulary: :meth:`medtune.models.medvlm.MedVLM.embed`
replaces placeholder positions *before* the embedding lookup, so the id never indexes the
embedding table; the output head covers only ``[0, vocab)``, so generation can never emit it; and
the embedding / output weights keep the published shapes, so HF, Meta and medtune checkpoints load
as they are (no resized table, nothing extra to save). Placeholders are never loss targets.
"""

from __future__ import annotations

NO_RESERVED_TOKEN_ID = -200
"""Image placeholder id of families without a reserved token (LLaVA's ``IMAGE_TOKEN_INDEX``)."""

# Families whose reserved placeholder sits at a fixed offset from the first special token
# (Llama-3's 256 special tokens follow the base ranks; <|reserved_special_token_0|> is the third).
_RESERVED_OFFSET_FROM_END = {"llama3": 256 - 2}

FAMILIES = ("llama3", "llama2", "mistral", "qwen2_5")


def placeholder_id(family: str, vocab_size: int | None = None) -> int:
    """The image placeholder id of ``family``.

    Args:
        family: one of :data:`FAMILIES`.
        vocab_size: rows of the decoder's embedding table (needed for Llama-3 only: base ranks +
            256 special tokens; 128,256 for the real models, fewer for tiny ones).

    Returns:
        The id: 128002 for a real Llama-3, ``vocab_size - 254`` for a tiny one,
        :data:`NO_RESERVED_TOKEN_ID` for every other family.

    Raises:
        ValueError: an unknown family, or Llama-3 without ``vocab_size``.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown LLM family {family!r}: expected one of {', '.join(FAMILIES)}")
    if family in _RESERVED_OFFSET_FROM_END:
        if vocab_size is None:
            raise ValueError(f"{family}: the placeholder id needs the vocabulary size")
        return int(vocab_size) - _RESERVED_OFFSET_FROM_END[family]
    return NO_RESERVED_TOKEN_ID


def is_outside_vocab(token_id: int, vocab_size: int) -> bool:
    """True when ``token_id`` can never be produced by a tokenizer of ``vocab_size`` ids."""
    return not 0 <= token_id < vocab_size
