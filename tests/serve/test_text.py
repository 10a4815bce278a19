"""TextStream: pieces never taken back (partial UTF-8, stop-string prefixes), cut at stops."""

from __future__ import annotations

from medtune.serve.text import TextStream


def decode(ids: list[int]) -> str:  # byte-level, like Llama-3's tokenizer
    return bytes(ids).decode("utf-8", "replace")


def feed_one_by_one(stream: TextStream, data: bytes) -> list[str]:
    pieces = [stream.feed([b]) for b in data]
    pieces.append(stream.close("stop"))
    return pieces


def test_partial_utf8_is_held_back():
    s = TextStream(decode, [], max_tokens=100)
    pieces = feed_one_by_one(s, "Lésion à droite".encode())
    assert "".join(pieces) == "Lésion à droite" == s.text
    assert all("\ufffd" not in p for p in pieces)
    assert s.finish_reason == "stop" and len(s.ids) == len("Lésion à droite".encode())


def test_stop_string_cuts_and_is_never_sent():
    s = TextStream(decode, ["END", "##"], max_tokens=100)
    pieces = feed_one_by_one(s, b"left side ENsure END more")
    assert "".join(pieces) == "left side ENsure " == s.text
    assert s.finish_reason == "stop"
    assert len(s.ids) == len(b"left side ENsure END")  # tokens consumed up to the stop
    assert s.feed([65]) == "" and s.text == "left side ENsure "  # nothing after the stop


def test_max_tokens_gives_length():
    s = TextStream(decode, ["zzz"], max_tokens=4)
    assert "".join(feed_one_by_one(s, b"abcdefgh")) == "abcd"
    assert s.finish_reason == "length" and len(s.ids) == 4


def test_all_at_once_equals_one_by_one():
    data = b"no lesion ## seen"
    a, b = TextStream(decode, ["##"], 50), TextStream(decode, ["##"], 50)
    feed_one_by_one(a, data)
    b.feed(list(data))
    b.close("stop")
    assert a.text == b.text == "no lesion " and a.ids == b.ids
