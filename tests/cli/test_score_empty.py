"""``medtune score`` refuses a predictions file with nothing to score (what a run killed before
its first row leaves), by name, with a non-zero exit, and writes no ``--out``."""

from __future__ import annotations

import pytest

from medtune._cli.main import main


def _score(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        status = main(["score", *argv])
    except SystemExit as e:
        status = e.code
    captured = capsys.readouterr()
    return int(status or 0), captured.out, captured.err


@pytest.mark.parametrize("content", ["", "\n\n"], ids=["0-byte", "blank-lines"])
def test_empty_predictions_file_is_refused_by_name(tmp_path, capsys, content):
    pred = tmp_path / "predictions.jsonl"
    pred.write_text(content)
    out = tmp_path / "metrics.json"
    status, stdout, err = _score(capsys, str(pred), "--out", str(out))
    assert status != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("medtune: error: "), err
    assert str(pred) in lines[0] and ("empty" in lines[0] or "no rows" in lines[0]), err
    assert not out.exists() and stdout == ""


def test_empty_file_among_several_is_refused_and_nothing_written(tmp_path, capsys):
    good = tmp_path / "good.jsonl"
    good.write_text(
        '{"id": 0, "question": "q", "answer": "yes", "answer_type": "CLOSED", "prediction": "yes"}\n'
    )
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    out = tmp_path / "metrics.json"
    status, _, err = _score(capsys, str(good), str(empty), "--out", str(out))
    assert status != 0 and str(empty) in err and "empty (0 bytes)" in err, err
    assert not out.exists()
