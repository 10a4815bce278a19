"""Generated ids -> the answer text, piece by piece, cut at ``stop`` strings and ``max_tokens``.

Streaming and non-streaming answers go through the same :class:`TextStream` one token at a time,
so the concatenated stream equals the non-streamed ``content`` exactly. A piece is held back while
it ends in an incomplete UTF-8 sequence (the decoder's ``\\ufffd``) or in a prefix of a stop
string, so that nothing is sent that a later token would take back.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

_PARTIAL = "\ufffd"


class TextStream:
    """Args:
    decode: ids -> text.
    stop: strings that end the answer (not included).
    max_tokens: the request's cap on generated tokens.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str], max_tokens: int):
        self._decode = decode
        self.stop = list(stop)
        self.max_tokens = int(max_tokens)
        self.ids: list[int] = []
        self.text = ""  # what has been handed out so far
        self.finish_reason: str | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def feed(self, ids: Sequence[int]) -> str:
        """Add generated ids; returns the new text that may be sent (possibly "")."""
        out = []
        for t in ids:
            if self.done:
                break
            self.ids.append(int(t))
            text = self._decode(self.ids)
            cut = self._find_stop(text)
            if cut is not None:
                self.finish_reason = "stop"
                out.append(self._emit(text[:cut]))
            elif len(self.ids) >= self.max_tokens:
                self.finish_reason = "length"
                out.append(self._emit(text))
            else:
                out.append(self._emit(self._safe(text)))
        return "".join(out)

    def close(self, finish_reason: str) -> str:
        """The model finished (``stop``: an end token, ``length``: the batch's cap); flush."""
        if self.done:
            return ""
        self.finish_reason = "length" if len(self.ids) >= self.max_tokens else finish_reason
        return self._emit(self._decode(self.ids))

    def _emit(self, text: str) -> str:
        new = text[len(self.text) :] if text.startswith(self.text) else ""
        self.text += new
        return new

    def _find_stop(self, text: str) -> int | None:
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _safe(self, text: str) -> str:
        """``text`` minus a tail that a later token could still change or turn into a stop."""
        end = len(text)
        while end and text[end - 1] == _PARTIAL:
            end -= 1
        hold = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, end), 0, -1):
                if text[:end].endswith(s[:k]):
                    hold = max(hold, k)
                    break
        return text[: end - hold]
