"""Chat formats as *pieces*, and the tokenizer protocol MedVLM's data path relies on.

A chat format turns ``(role, parts)`` turns into a list of :class:`Piece`: text, or ids inserted
verbatim (special tokens, image placeholders), each marked as a loss target or not. A tokenizer
(:class:`ChatTokenizer`) encodes the text pieces one by one, so image placeholders and special
tokens stay ids from the start: text is never decoded and re-encoded.

Encoding a text piece on its own is how MiniGPT-4 / XrayGPT (``prompt_wrap``: the text before and
after ``<ImageHere>`` tokenized separately), mistral-common (each instruction and answer encoded
separately) and torchtune's ``tokenize_messages`` build their prompts. For sentencepiece
vocabularies (Llama-2, Vicuna, Mistral), whose encoder adds a "dummy prefix" space to every call,
one rule makes a piece encode to what its text says: a piece that starts with a space is encoded
with the dummy prefix standing for that space; any other piece is encoded without it (torchtune's
``trim_leading_whitespace``).

The protocol (what the model transform, generation, eval and serve use):
``encode_messages(messages, add_generation_prompt=..., train_on=...) -> (ids, mask)``,
``image_token_id``, ``stop_tokens``, ``pad_id``, ``bos_id``, ``eos_id``, ``encode``,
``decode(ids, skip_special_tokens=True)``. torchtune's ``Llama3Tokenizer`` gets the first two
through :func:`medtune.models.llm.encode_messages` / :func:`medtune.models.llm.image_token_id`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

Turn = tuple[str, Sequence[str | int]]


@dataclasses.dataclass
class Piece:
    """A run of text (``str``) or of ids (``list[int]``), and whether it is a loss target."""

    content: str | list[int]
    target: bool = False


def strip_turn(parts: Sequence[str | int]) -> list[str | int]:
    """Strip a turn's text at its outer ends only (as the Llama-3 reference does)."""
    parts = list(parts)
    text_idx = [i for i, p in enumerate(parts) if isinstance(p, str)]
    if text_idx and text_idx[0] == 0:
        parts[0] = parts[0].lstrip()
    if text_idx and text_idx[-1] == len(parts) - 1:
        parts[-1] = parts[-1].rstrip()
    return parts


def content_pieces(
    parts: Sequence[str | int], target: bool, image_wrap: tuple[str, str] = ("", "")
) -> list[Piece]:
    """A turn's parts as pieces; each run of image ids is wrapped in ``image_wrap`` text
    (MiniGPT-4's ``<Img>`` / ``</Img>``)."""
    out: list[Piece] = []
    i = 0
    parts = list(parts)
    while i < len(parts):
        p = parts[i]
        if isinstance(p, str):
            if p:
                out.append(Piece(p, target))
            i += 1
            continue
        run = []
        while i < len(parts) and not isinstance(parts[i], str):
            run.append(int(parts[i]))
            i += 1
        if image_wrap[0]:
            out.append(Piece(image_wrap[0], target))
        out.append(Piece(run, target))
        if image_wrap[1]:
            out.append(Piece(image_wrap[1], target))
    return merge_text(out)


def merge_text(pieces: list[Piece]) -> list[Piece]:
    """Join neighbouring text pieces with the same target flag (one encode call each)."""
    out: list[Piece] = []
    for p in pieces:
        if (
            out
            and isinstance(p.content, str)
            and isinstance(out[-1].content, str)
            and out[-1].target == p.target
        ):
            out[-1] = Piece(out[-1].content + p.content, p.target)
        elif not (isinstance(p.content, str) and not p.content):
            out.append(p)
    return out


class ChatTokenizer:
    """Base of medtune's family tokenizers: pieces -> ids with a per-id target mask.

    Subclasses set ``bos_id``, ``eos_id``, ``pad_id``, ``stop_tokens``, ``image_token_id``,
    ``vocab_size`` and implement :meth:`_encode_text` and :meth:`format` (the chat format).

    Args:
        max_seq_len: kept for torchtune's tokenizer interface (the model transform checks lengths).
    """

    image_token_id: int
    stop_tokens: list[int]

    def __init__(self, max_seq_len: int | None = None):
        self.max_seq_len = max_seq_len

    def _encode_text(self, text: str) -> list[int]:
        raise NotImplementedError

    def format(
        self, messages: Sequence[Turn], add_generation_prompt: bool, train_on
    ) -> list[Piece]:
        raise NotImplementedError

    def encode_messages(
        self,
        messages: Sequence[Turn],
        *,
        add_generation_prompt: bool = False,
        train_on: Sequence[str] = ("assistant",),
    ) -> tuple[list[int], list[bool]]:
        """Encode chat turns; ``int`` parts (image placeholders) are kept as ids.

        Args:
            messages: ``(role, parts)`` pairs, roles ``system | user | assistant``.
            add_generation_prompt: end with the open assistant turn, for generation.
            train_on: roles whose content (and end-of-turn marker) are loss targets.

        Returns:
            ``(ids, mask)``: ids and, per id, whether it is a loss target.
        """
        ids: list[int] = []
        mask: list[bool] = []
        for piece in self.format(messages, add_generation_prompt, tuple(train_on)):
            chunk = (
                self._encode_text(piece.content)
                if isinstance(piece.content, str)
                else list(piece.content)
            )
            ids += chunk
            mask += [piece.target] * len(chunk)
        return ids, mask

    def check_roles(self, messages: Sequence[Turn]) -> None:
        for role, _ in messages:
            if role not in ("system", "user", "assistant"):
                raise ValueError(f"unknown chat role {role!r}: expected system, user or assistant")


def split_system(messages: Sequence[Turn]) -> tuple[str | None, list[Turn]]:
    """``(system text or None, the other turns)``; a system turn must come first."""
    msgs = list(messages)
    if msgs and msgs[0][0] == "system":
        text = "".join(p for p in msgs[0][1] if isinstance(p, str)).strip()
        return text, msgs[1:]
    return None, msgs


TextEncoder = Callable[[str], list[int]]
