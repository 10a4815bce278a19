"""Sentencepiece chat tokenizers (Llama-2 / Vicuna, Mistral): one encode call per text piece.

Llama-2, Vicuna and Mistral v0.1-v0.2 ship a sentencepiece ``tokenizer.model`` (32,000 pieces,
byte fallback, ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, no pad) and reserve no token an image could
use: the placeholder is :data:`medtune.models.llm.placeholder.NO_RESERVED_TOKEN_ID`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from medtune.models.llm.chat import ChatTokenizer, Piece, Turn
from medtune.models.llm.placeholder import NO_RESERVED_TOKEN_ID


class SentencePieceChatTokenizer(ChatTokenizer):
    """A sentencepiece model + a chat format (set by subclasses in :meth:`format`).

    Text pieces follow one rule (see :mod:`medtune.models.llm.chat`): a piece starting with a
    space is encoded with sentencepiece's dummy prefix standing for that space; any other piece
    without it. So ``" ASSISTANT:"`` encodes as it does inside a whole prompt, and text glued to a
    special id (``</s>USER:``) gets no stray space.

    Args:
        path: the sentencepiece ``tokenizer.model``.
        max_seq_len: kept for torchtune's interface.

    Raises:
        FileNotFoundError: naming the missing file.
    """

    def __init__(self, path: str, max_seq_len: int | None = None):
        super().__init__(max_seq_len)
        if not Path(path).is_file():
            raise FileNotFoundError(
                f"tokenizer file not found: {path} (expected a sentencepiece tokenizer.model)"
            )
        from sentencepiece import SentencePieceProcessor

        self._sp = SentencePieceProcessor()
        self._sp.Load(str(path))
        self.path = str(path)
        self.vocab_size = self._sp.GetPieceSize()
        self.bos_id = self._sp.bos_id()
        self.eos_id = self._sp.eos_id()
        # the released models have no pad: 0 (<unk>) as torchtune's Llama2Tokenizer uses; padded
        # positions are never targets and are masked out of attention
        self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else 0
        self.image_token_id = NO_RESERVED_TOKEN_ID
        self.stop_tokens = [self.eos_id]
        self.stop_sequences: list[list[int]] = []  # multi-token stops (generation matches them)
        self._nl = self._sp.EncodeAsIds("\n")

    def _encode_text(self, text: str) -> list[int]:
        if text.startswith(" "):
            return list(self._sp.EncodeAsIds(text[1:]))
        # no dummy prefix: encode "\n" + text and drop the "\n" ids (torchtune's
        # trim_leading_whitespace), since sentencepiece has no switch for it per call
        ids = self._sp.EncodeAsIds("\n" + text)
        if ids[: len(self._nl)] != self._nl:
            raise ValueError(f"{self.path}: cannot encode {text[:40]!r} without a leading space")
        return list(ids[len(self._nl) :])

    def encode(
        self,
        text: str,
        add_bos: bool = True,
        add_eos: bool = True,
        trim_leading_whitespace: bool = False,
    ) -> list[int]:
        """Plain text -> ids (sentencepiece's own encoding, dummy prefix included unless
        ``trim_leading_whitespace``)."""
        ids = self._encode_text(text) if trim_leading_whitespace else self._sp.EncodeAsIds(text)
        return [self.bos_id] * add_bos + list(ids) + [self.eos_id] * add_eos

    def decode(
        self,
        token_ids: Sequence[int],
        truncate_at_eos: bool = True,
        skip_special_tokens: bool = True,
    ) -> str:
        """Ids -> text; stops at the first stop token when ``truncate_at_eos``; ids outside the
        vocabulary (image placeholders) are dropped."""
        out = []
        stops = set(self.stop_tokens)
        for t in token_ids:
            t = int(t)
            if truncate_at_eos and t in stops:
                break
            if not 0 <= t < self.vocab_size:
                continue
            if skip_special_tokens and t in (self.bos_id, self.eos_id):
                continue
            out.append(t)
        return self._sp.DecodeIds(out)

    def piece_id(self, text: str) -> int | None:
        """The id when ``text`` (encoded without a dummy prefix) is one piece, else None."""
        ids = self._encode_text(text)
        return ids[0] if len(ids) == 1 else None

    def spellings(self, text: str) -> list[list[int]]:
        """Every id sequence whose pieces spell ``text``, glued to what precedes it or after a
        space (``"▁"`` inside the first piece), with byte-fallback pieces for characters that
        have no piece; a sequence that ends with another one is left out (matching the shorter
        one already stops).

        A model can emit a string in any of its segmentations (Vicuna writes ``###`` as ``▁###``
        or ``##`` + ``#``: MiniGPT-4 stops on both), so a stop string is all of them.
        """
        pieces = {self._sp.IdToPiece(i): i for i in range(self.vocab_size)}
        byte_ids = {}
        for ch in set(text) - set(pieces):
            ids = [pieces.get(f"<0x{b:02X}>") for b in ch.encode()]
            if all(i is not None for i in ids):
                byte_ids[ch] = ids

        def split(rest: str) -> list[list[int]]:
            if not rest:
                return [[]]
            out = []
            for n in range(1, len(rest) + 1):
                if rest[:n] in pieces and not self._sp.IsControl(pieces[rest[:n]]):
                    out += [[pieces[rest[:n]], *tail] for tail in split(rest[n:])]
            if rest[0] in byte_ids:
                out += [[*byte_ids[rest[0]], *tail] for tail in split(rest[1:])]
            return out

        spaced = [s for s in split("\u2581" + text) if self._sp.IdToPiece(s[0]) != "\u2581"]
        found = sorted({tuple(s) for s in split(text) + spaced}, key=lambda s: (len(s), s))
        keep: list[tuple[int, ...]] = []
        for s in found:  # shortest first: drop those ending with a kept one
            if not any(s[len(s) - len(k) :] == k for k in keep):
                keep.append(s)
        return [list(s) for s in keep]

    def format(
        self, messages: Sequence[Turn], add_generation_prompt: bool, train_on
    ) -> list[Piece]:
        raise NotImplementedError
