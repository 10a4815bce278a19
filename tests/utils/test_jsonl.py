"""medtune.utils.jsonl: torn-tail repair, bad lines named file:line, append, atomic writes."""

import json
import os

import pytest

from medtune.utils.errors import UserError
from medtune.utils.jsonl import (
    JsonlError,
    append_jsonl,
    read_jsonl,
    write_jsonl_atomic,
    write_text_atomic,
)


def test_roundtrip_keeps_order_unicode_and_skips_blank_lines(tmp_path):
    path = tmp_path / "a.jsonl"
    write_jsonl_atomic(path, [{"id": 1, "q": "肝?"}, {"id": 2}])
    with open(path, "a", encoding="utf-8") as fh:
        fh.write("\n")
        append_jsonl(fh, {"id": 3})
    append_jsonl(path, {"id": 4})
    assert "肝" in path.read_text(encoding="utf-8")  # not \u-escaped
    assert read_jsonl(path) == [{"id": 1, "q": "肝?"}, {"id": 2}, {"id": 3}, {"id": 4}]


def test_torn_last_line_dropped_and_repaired(tmp_path):
    path = tmp_path / "a.jsonl"
    good = json.dumps({"id": 1}) + "\n"
    path.write_text(good + '{"id": 2, "predic')
    assert read_jsonl(path) == [{"id": 1}]
    assert path.read_text() == good + '{"id": 2, "predic'  # repair=False leaves the file alone
    assert read_jsonl(path, repair=True) == [{"id": 1}]
    assert path.read_text() == good
    append_jsonl(path, {"id": 2})
    assert read_jsonl(path) == [{"id": 1}, {"id": 2}]


def test_valid_last_line_without_newline_is_kept_and_terminated(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"id": 1}\n{"id": 2}')
    assert read_jsonl(path, repair=True) == [{"id": 1}, {"id": 2}]
    append_jsonl(path, {"id": 3})
    assert read_jsonl(path) == [{"id": 1}, {"id": 2}, {"id": 3}]


def test_torn_utf8_tail_is_dropped(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"id": 1}\n' + '{"q": "肝'.encode()[:-1])
    assert read_jsonl(path, repair=True) == [{"id": 1}]
    assert path.read_bytes() == b'{"id": 1}\n'


@pytest.mark.parametrize(
    "text, line, what",
    [
        ('{"id": 1}\nnot json\n{"id": 3}\n', 2, "not valid JSON"),
        ('{"id": 1}\n[1, 2]\n', 2, "expected a JSON object of predictions, got list"),
        ('{"id": 1}\n\n{"id": \n', 3, "not valid JSON"),  # terminated: not a torn tail
    ],
)
def test_bad_line_names_file_and_line(tmp_path, text, line, what):
    path = tmp_path / "p.jsonl"
    path.write_text(text)
    with pytest.raises(JsonlError) as e:
        read_jsonl(path, what="predictions")
    assert isinstance(e.value, UserError)
    assert str(e.value).startswith(f"{path}:{line}: ")
    assert what in str(e.value)


def test_not_utf8_names_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"id": 1}\n{"q": "\xff"}\n')
    with pytest.raises(JsonlError, match=r"p\.jsonl:2: not UTF-8"):
        read_jsonl(path)


def test_append_unserialisable_row_writes_nothing(tmp_path):
    path = tmp_path / "a.jsonl"
    with pytest.raises(TypeError):
        append_jsonl(path, {"x": object()})
    assert not path.exists() or path.read_text() == ""


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    path = tmp_path / "sub" / "out.md"
    write_text_atomic(path, "one\n")
    write_text_atomic(path, "two\n")
    assert path.read_text() == "two\n"
    assert os.listdir(path.parent) == ["out.md"]


def test_atomic_write_failure_keeps_old_file(tmp_path):
    path = tmp_path / "a.jsonl"
    write_jsonl_atomic(path, [{"id": 1}])
    with pytest.raises(TypeError):
        write_jsonl_atomic(path, [{"id": object()}])
    assert read_jsonl(path) == [{"id": 1}]
    assert os.listdir(tmp_path) == ["a.jsonl"]


def test_strict_refuses_torn_tail(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": 1}\n{"id": 2, "pre')
    with pytest.raises(JsonlError, match=r"p\.jsonl:2: not valid JSON"):
        read_jsonl(path, strict=True)
    assert path.read_text() == '{"id": 1}\n{"id": 2, "pre'
