"""medtune.data.rows: JSON / JSONL rows, checked fields, image paths."""

from __future__ import annotations

import pytest

from medtune.data import errors, rows
from medtune.data.errors import MalformedJSONError, MissingFieldError, MissingImageError


def test_row_helpers_live_only_in_rows():
    for name in ("Samples", "SkipCounter", "load_json", "load_rows", "get_field", "resolve_image"):
        assert hasattr(rows, name)
        assert not hasattr(errors, name), f"medtune.data.errors re-exports {name}"


def test_load_rows_json_and_jsonl(tmp_path):
    (tmp_path / "a.json").write_text('[{"id": 1}, {"id": 2}]')
    assert rows.load_rows(tmp_path / "a.json") == [{"id": 1}, {"id": 2}]
    (tmp_path / "a.jsonl").write_text('{"id": 1}\n\n{"id": 2}\n')
    assert rows.load_rows(tmp_path / "a.jsonl") == [{"id": 1}, {"id": 2}]
    (tmp_path / "b.jsonl").write_text('{"id": 1}\n{"id": \n')
    with pytest.raises(MalformedJSONError, match=r"b\.jsonl: malformed JSON at line 2"):
        rows.load_rows(tmp_path / "b.jsonl")
    (tmp_path / "c.json").write_text('{"id": 1}')
    with pytest.raises(MalformedJSONError, match="expected a list of rows"):
        rows.load_rows(tmp_path / "c.json")


def test_get_field_and_resolve_image(tmp_path):
    kw = {"file": "t.json", "index": 3, "row_id": 9}
    assert rows.get_field({"q": "x"}, "q", **kw) == "x"
    with pytest.raises(MissingFieldError, match=r"^t\.json row 3 \(id 9\): missing field 'a'"):
        rows.get_field({"q": "x"}, "a", **kw)
    with pytest.raises(MissingFieldError, match="field 'n' is bool True"):
        rows.get_field({"n": True}, "n", types=(int,), expected="an integer", **kw)
    (tmp_path / "img.png").write_bytes(b"x")
    assert rows.resolve_image(tmp_path, "img.png", **kw) == str(tmp_path / "img.png")
    with pytest.raises(MissingImageError, match="image not found"):
        rows.resolve_image(tmp_path, "nope.png", **kw)


def test_skip_counter_counts_by_reason():
    counter = rows.SkipCounter("src", skip=True)
    counter.record(MissingFieldError("x"))
    counter.record(MissingFieldError("y"))
    out = counter.finish([1, 2])
    assert list(out) == [1, 2] and out.skipped == {"missing field": 2}
    assert out.summary() == "src: kept 2, skipped 2 (missing field: 2)"
    with pytest.raises(MissingFieldError):
        rows.SkipCounter("src", skip=False).record(MissingFieldError("x"))
