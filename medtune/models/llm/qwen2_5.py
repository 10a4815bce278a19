"""Qwen2.5 (Instruct): decoder (torchtune's ``qwen2``), byte-level BPE tokenizer, ChatML.

The format is Qwen2.5's ``chat_template`` (ChatML)::

    <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{q}<|im_end|>\\n<|im_start|>assistant\\n{a}<|im_end|>\\n

with the template's default system text (:data:`QWEN_SYSTEM`) when a sample has none. Every
special token is an id and text pieces meet only at special tokens, so encoding piece by piece
gives the ids of the whole string. Targets: each answer + ``<|im_end|>``; generation stops at
``<|im_end|>`` and ``<|endoftext|>``. The image placeholder is
:data:`medtune.models.llm.placeholder.NO_RESERVED_TOKEN_ID`: ``<|image_pad|>`` exists, but
Qwen's tokenizer turns that *text* in a question into the special id (see the placeholder module).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from torchtune.models import qwen2 as _tt_qwen2
from torchtune.models.qwen2_5 import qwen2_5_tokenizer as _tt_qwen2_5_tokenizer
from torchtune.modules import TransformerDecoder

from medtune.models.llama3 import build_decoder
from medtune.models.llm.chat import (
    ChatTokenizer,
    Piece,
    Turn,
    content_pieces,
    merge_text,
    split_system,
    strip_turn,
)
from medtune.models.llm.placeholder import NO_RESERVED_TOKEN_ID

QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
"""Qwen2.5-Instruct's default system prompt (its chat template's)."""


class QwenChatTokenizer(ChatTokenizer):
    """torchtune's Qwen2.5 tokenizer with ChatML.

    Args:
        path: ``vocab.json``.
        merges_file: ``merges.txt``.
        special_tokens_path: HF ``tokenizer.json`` (its ``added_tokens``); None: Qwen2.5's ids.
        system_prompt: default system text (None: :data:`QWEN_SYSTEM`; ``""``: none).
        max_seq_len: kept for torchtune's interface.
    """

    def __init__(
        self,
        path: str,
        merges_file: str,
        special_tokens_path: str | None = None,
        system_prompt: str | None = None,
        max_seq_len: int | None = None,
    ):
        super().__init__(max_seq_len)
        for f in (path, merges_file, special_tokens_path):
            if f is not None and not Path(f).is_file():
                raise FileNotFoundError(f"tokenizer file not found: {f}")
        self._tt = _tt_qwen2_5_tokenizer(path, merges_file, special_tokens_path)
        self.special_tokens = self._tt.special_tokens
        self.im_start = self.special_tokens["<|im_start|>"]
        self.im_end = self.special_tokens["<|im_end|>"]
        self.endoftext = self.special_tokens["<|endoftext|>"]
        self.bos_id = None  # Qwen prompts start without a BOS
        self.eos_id = self.im_end
        self.pad_id = self.endoftext
        self.stop_tokens = [self.im_end, self.endoftext]
        self.image_token_id = NO_RESERVED_TOKEN_ID
        self.vocab_size = max(self.special_tokens.values()) + 1
        self.system_prompt = QWEN_SYSTEM if system_prompt is None else system_prompt

    def _encode_text(self, text: str) -> list[int]:
        return self._tt.encode(text, add_bos=False, add_eos=False)

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Plain text -> ids (``add_eos`` appends ``<|im_end|>``)."""
        return self._encode_text(text) + [self.eos_id] * add_eos

    def decode(
        self,
        token_ids: Sequence[int],
        truncate_at_eos: bool = True,
        skip_special_tokens: bool = True,
    ) -> str:
        """Ids -> text, stopping at the first stop token when ``truncate_at_eos``; ids outside the
        vocabulary (image placeholders, the embedding table's padding rows) are dropped."""
        out = []
        for t in token_ids:
            t = int(t)
            if truncate_at_eos and t in self.stop_tokens:
                break
            if 0 <= t < self.vocab_size:
                out.append(t)
        return self._tt.decode(out, skip_special_tokens=skip_special_tokens)

    def format(
        self, messages: Sequence[Turn], add_generation_prompt: bool, train_on
    ) -> list[Piece]:
        self.check_roles(messages)
        system, turns = split_system(messages)
        system = self.system_prompt if system is None else system
        out: list[Piece] = []
        if system:
            out += [Piece([self.im_start]), Piece("system\n" + system), Piece([self.im_end])]
            out.append(Piece("\n"))
        for role, parts in turns:
            target = role in train_on
            out += [Piece([self.im_start]), Piece(f"{role}\n")]
            out += content_pieces(strip_turn(parts), target)
            out += [Piece([self.im_end], target), Piece("\n")]
        if add_generation_prompt:
            out += [Piece([self.im_start]), Piece("assistant\n")]
        return merge_text(out)


def qwen2_5_tokenizer(
    path: str,
    merges_file: str,
    special_tokens_path: str | None = None,
    system_prompt: str | None = None,
    max_seq_len: int | None = None,
) -> QwenChatTokenizer:
    """``_component_`` for Qwen2.5 tokenizers (see :class:`QwenChatTokenizer`)."""
    return QwenChatTokenizer(path, merges_file, special_tokens_path, system_prompt, max_seq_len)


def qwen2(**kwargs) -> TransformerDecoder:
    """torchtune's ``qwen2`` component builder (Qwen2 / 2.5 shapes), honouring ``build_decoders_on``."""
    return build_decoder(_tt_qwen2.qwen2, **kwargs)


def qwen2_5_7b_instruct(max_seq_len: int = 32768) -> TransformerDecoder:
    """Qwen2.5-7B-Instruct (7,615,616,512 parameters: untied 152,064-row embedding and head)."""
    return qwen2(
        vocab_size=152064,
        num_layers=28,
        num_heads=28,
        num_kv_heads=4,
        embed_dim=3584,
        intermediate_dim=18944,
        max_seq_len=max_seq_len,
        norm_eps=1e-6,
        rope_base=1_000_000.0,
    )
