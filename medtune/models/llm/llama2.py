"""Llama-2 / Vicuna: decoders (torchtune's ``llama2``), the sentencepiece tokenizer and two chat
formats, Vicuna v1.1 and MiniGPT-4 / XrayGPT's ``###Human: ... ###Assistant:``.

Formats, followed exactly:

- ``vicuna_v1.1``: FastChat's ``vicuna_v1.1`` conversation template (``SeparatorStyle.ADD_COLON_TWO``,
  sep ``" "``, sep2 ``"</s>"``)::

      <s>{system} USER: {q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT:

  with FastChat's default system prompt when the sample has none. Targets: each answer + ``</s>``.
- ``minigpt4``: the prompt MiniGPT-4 and XrayGPT *train* on (``xraygpt/models/mini_gpt4.py``
  ``MiniGPT4.forward`` / ``prompt_wrap`` with ``prompt_template: '###Patient: {} ###Doctor: '``,
  ``end_sym: '###'``), where the text before and after the image embeddings is tokenized
  separately (hence the space before ``</Img>``)::

      <s>###Human: <Img>[image]</Img> {q} ###Assistant:  {a}###

  ``roles=("Patient", "Doctor")`` gives XrayGPT's. Targets: each answer + ``###``. Generation stops
  at ``</s>`` and at ``###`` as a stop *sequence* (``stop_sequences``: every id sequence that spells
  ``###``, glued or after a space; XrayGPT's ``StoppingCriteriaSub`` stops when the output ends
  with ``[835]`` (``▁###``) or ``[2277, 29937]`` (``##`` + ``#``), two of them), and decoding
  cuts the text at ``###`` as XrayGPT's ``output_text.split('###')[0]``.

The image placeholder is :data:`medtune.models.llm.placeholder.NO_RESERVED_TOKEN_ID` (Llama-2's
vocabulary reserves none). Vicuna-7B v0 (XrayGPT) is LLaMA-1 7B: Llama-2-7B's shape with a
2,048-token context; Vicuna v1.5 is Llama-2-7B.
"""

from __future__ import annotations

from collections.abc import Sequence

from torchtune.models import llama2 as _tt_llama2
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

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the user's questions."
)
"""FastChat's ``vicuna_v1.1`` system prompt."""

CHAT_FORMATS = ("vicuna_v1.1", "minigpt4")


class VicunaTokenizer(SentencePieceChatTokenizer):
    """Llama-2 / Vicuna sentencepiece tokenizer with a chat format.

    Args:
        path: ``tokenizer.model`` (sentencepiece).
        chat_format: ``"vicuna_v1.1"`` or ``"minigpt4"``.
        roles: the user / assistant names of the ``minigpt4`` format (XrayGPT: Patient, Doctor).
        system_prompt: the default system text (``vicuna_v1.1``: FastChat's; a sample's own system
            turn wins).
        max_seq_len: kept for torchtune's interface.
    """

    def __init__(
        self,
        path: str,
        chat_format: str = "vicuna_v1.1",
        roles: Sequence[str] | None = None,
        system_prompt: str | None = None,
        max_seq_len: int | None = None,
    ):
        super().__init__(path, max_seq_len)
        if chat_format not in CHAT_FORMATS:
            raise ValueError(
                f"chat_format {chat_format!r}: expected one of {', '.join(CHAT_FORMATS)}"
            )
        self.chat_format = chat_format
        if chat_format == "vicuna_v1.1":
            self.roles = tuple(roles or ("USER", "ASSISTANT"))
            self.system_prompt = VICUNA_SYSTEM if system_prompt is None else system_prompt
        else:
            self.roles = tuple(roles or ("Human", "Assistant"))
            self.system_prompt = system_prompt
            self.stop_sequences = self.spellings("###")
        if len(self.roles) != 2:
            raise ValueError(f"roles: expected (user, assistant), got {self.roles}")

    def decode(
        self,
        token_ids: Sequence[int],
        truncate_at_eos: bool = True,
        skip_special_tokens: bool = True,
    ) -> str:
        """Ids -> text; ``minigpt4`` cuts at ``###`` when ``truncate_at_eos`` (MiniGPT-4's
        ``output_text.split('###')[0]``)."""
        text = super().decode(token_ids, truncate_at_eos, skip_special_tokens)
        if truncate_at_eos and self.chat_format == "minigpt4":
            text = text.split("###")[0]
        return text

    def format(
        self, messages: Sequence[Turn], add_generation_prompt: bool, train_on
    ) -> list[Piece]:
        self.check_roles(messages)
        system, turns = split_system(messages)
        system = self.system_prompt if system is None else system
        user, asst = self.roles
        vicuna = self.chat_format == "vicuna_v1.1"
        out = [Piece([self.bos_id])]
        # the first text after <s> gets the dummy prefix, as encoding the whole prompt does
        lead = " "
        if system:
            out.append(Piece(lead + system))
            lead = " " if vicuna else ""
        glued = False  # right after </s> or ###: no space
        for role, parts in turns:
            parts = strip_turn(parts)
            target = role in train_on
            if role == "user":
                if vicuna:
                    head = ("" if glued else lead) + f"{user}: "
                    out += [Piece(head), *content_pieces(parts, target), Piece(f" {asst}:")]
                else:
                    # after an answer's "###" the next turn continues it: "###Human: "
                    head = f"{user}: " if glued else lead + f"###{user}: "
                    # "<Img><ImageHere></Img> {q}": text after the image is a separate encode
                    # call in prompt_wrap, hence " </Img>"
                    wrapped = content_pieces(parts, target, image_wrap=("<Img>", " </Img> "))
                    last = wrapped[-1] if wrapped else None
                    if last is not None and isinstance(last.content, str):
                        wrapped[-1] = Piece(last.content.rstrip(" "), last.target)
                    # the trailing space is MiniGPT-4's template's ('###Assistant: ')
                    out += [Piece(head), *wrapped, Piece(f" ###{asst}: ")]
                glued = False
            else:  # assistant: " {answer}" then </s> (Vicuna) or "###" (MiniGPT-4's end_sym)
                end = [Piece([self.eos_id], target)] if vicuna else [Piece("###", target)]
                body = content_pieces(parts, target)
                if body and isinstance(body[0].content, str):
                    body[0] = Piece(" " + body[0].content, body[0].target)
                out += [*body, *end]
                glued = True
            lead = " "
        # generation: the prompt already ends with the open assistant turn of the last user turn
        return merge_text(out)


def vicuna_tokenizer(
    path: str,
    chat_format: str = "vicuna_v1.1",
    roles: list[str] | None = None,
    system_prompt: str | None = None,
    max_seq_len: int | None = None,
) -> VicunaTokenizer:
    """``_component_`` for Llama-2 / Vicuna tokenizers (see :class:`VicunaTokenizer`)."""
    return VicunaTokenizer(path, chat_format, roles, system_prompt, max_seq_len)


def xraygpt_tokenizer(path: str, max_seq_len: int | None = None) -> VicunaTokenizer:
    """XrayGPT's Vicuna tokenizer and format: ``###Patient: ... ###Doctor:`` (no system prompt)."""
    return VicunaTokenizer(path, "minigpt4", ("Patient", "Doctor"), None, max_seq_len)


def llama2(**kwargs) -> TransformerDecoder:
    """torchtune's ``llama2`` component builder (any shape), honouring ``build_decoders_on``."""
    return build_decoder(_tt_llama2.llama2, **kwargs)


def llama2_7b(max_seq_len: int = 4096) -> TransformerDecoder:
    """Llama-2-7B / Vicuna-7B v1.5 (6,738,415,616 parameters)."""
    return llama2(
        vocab_size=32_000,
        num_layers=32,
        num_heads=32,
        num_kv_heads=32,
        embed_dim=4096,
        max_seq_len=max_seq_len,
        norm_eps=1e-5,
    )


def vicuna_7b_v0() -> TransformerDecoder:
    """Vicuna-7B v0 (LLaMA-1 7B, XrayGPT's LLM): Llama-2-7B's shape with a 2,048-token context
    (``norm_eps`` 1e-6 as LLaMA-1's ``params.json``)."""
    return llama2(
        vocab_size=32_000,
        num_layers=32,
        num_heads=32,
        num_kv_heads=32,
        embed_dim=4096,
        max_seq_len=2048,
        norm_eps=1e-6,
    )
