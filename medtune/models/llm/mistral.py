"""Mistral-7B-Instruct v0.2: decoder (torchtune's ``mistral``), sentencepiece tokenizer, chat format.

The format is what Mistral's reference tokenizer (mistral-common, tokenizer version V1, used by
v0.1 and v0.2) produces: every instruction and every answer is a separate sentencepiece call::

    <s>[INST] {q1} [/INST] {a1}</s>[INST] {q2} [/INST]

(the space before each answer and before later ``[INST]`` is the dummy prefix of its own call).
Mistral has no system role: V1 prepends the system text to the *last* user message, separated by
``"\\n\\n"``, and so does this format. Targets: each answer + ``</s>``; generation stops at ``</s>``.
The image placeholder is :data:`medtune.models.llm.placeholder.NO_RESERVED_TOKEN_ID`.
"""

from __future__ import annotations

from collections.abc import Sequence

from torchtune.models import mistral as _tt_mistral
from torchtune.modules import TransformerDecoder

from medtune.models.llama3 import build_decoder
from medtune.models.llm.chat import (
    Piece,
    Turn,
    content_pieces,
    merge_text,
    split_system,
    strip_turn,
)
from medtune.models.llm.sentencepiece import SentencePieceChatTokenizer


class MistralInstructTokenizer(SentencePieceChatTokenizer):
    """Mistral v0.2 sentencepiece tokenizer with the ``[INST] ... [/INST]`` format.

    Args:
        path: ``tokenizer.model`` (sentencepiece).
        max_seq_len: kept for torchtune's interface.
    """

    def format(
        self, messages: Sequence[Turn], add_generation_prompt: bool, train_on
    ) -> list[Piece]:
        self.check_roles(messages)
        system, turns = split_system(messages)
        last_user = max((i for i, (r, _) in enumerate(turns) if r == "user"), default=-1)
        out = [Piece([self.bos_id])]
        for i, (role, parts) in enumerate(turns):
            parts = strip_turn(parts)
            target = role in train_on
            if role == "user":
                if system and i == last_user:
                    parts = [system + "\n\n", *parts]
                out += [Piece(" [INST] "), *content_pieces(parts, target), Piece(" [/INST]")]
            else:
                body = content_pieces(parts, target)
                if body and isinstance(body[0].content, str):
                    body[0] = Piece(" " + body[0].content, body[0].target)
                out += [*body, Piece([self.eos_id], target)]
        return merge_text(out)


def mistral_tokenizer(path: str, max_seq_len: int | None = None) -> MistralInstructTokenizer:
    """``_component_`` for the Mistral v0.1 / v0.2 tokenizer (``tokenizer.model``)."""
    return MistralInstructTokenizer(path, max_seq_len)


def mistral(**kwargs) -> TransformerDecoder:
    """torchtune's ``mistral`` component builder (any shape), honouring ``build_decoders_on``."""
    return build_decoder(_tt_mistral.mistral, **kwargs)


def mistral_7b_instruct_v0_2(max_seq_len: int = 32768) -> TransformerDecoder:
    """Mistral-7B-Instruct-v0.2 (7,241,732,096 parameters; RoPE base 1e6, no sliding window, as
    its ``config.json``)."""
    return mistral(
        vocab_size=32_000,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        embed_dim=4096,
        intermediate_dim=14336,
        max_seq_len=max_seq_len,
        norm_eps=1e-5,
        rope_base=1_000_000,
    )
