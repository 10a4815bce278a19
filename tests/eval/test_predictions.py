"""The predictions JSONL schema: write, read, validate with clear errors."""

import io
import json

import pytest

from medtune.eval.predictions import (
    REQUIRED_KEYS,
    PredictionsError,
    read_predictions,
    validate_row,
    write_prediction,
)


def make_row(i=1, **kw):
    row = {
        "id": f"q{i}",
        "dataset": "slake",
        "split": "test",
        "image": "xmlab1/source.jpg",
        "question": "Is this a CT?",
        "answer": "Yes",
        "answer_type": "CLOSED",
        "prediction": "yes",
        "checkpoint": "runs/a/epoch_2",
        "generation": {"max_new_tokens": 32, "temperature": 0.0},
        "language": "en",
    }
    row.update(kw)
    return row


def test_write_then_read_roundtrip(tmp_path):
    path = tmp_path / "preds.jsonl"
    with open(path, "w", encoding="utf-8") as fh:
        write_prediction(fh, make_row(1))
        write_prediction(fh, make_row(2, answer=3, question="How many? 肝"))
    rows = read_predictions(path)
    assert [r["id"] for r in rows] == ["q1", "q2"]
    assert rows[1]["answer"] == 3 and rows[1]["question"].endswith("肝")


def test_write_rejects_bad_row_and_writes_nothing():
    fh = io.StringIO()
    row = make_row()
    del row["prediction"]
    with pytest.raises(PredictionsError, match="'prediction'"):
        write_prediction(fh, row)
    assert fh.getvalue() == ""


def test_read_names_file_line_and_key(tmp_path):
    path = tmp_path / "p.jsonl"
    bad = make_row(2)
    del bad["answer_type"]
    path.write_text(json.dumps(make_row(1)) + "\n\n" + json.dumps(bad) + "\n")
    with pytest.raises(PredictionsError) as e:
        read_predictions(path)
    assert f"{path}:3" in str(e.value) and "'answer_type'" in str(e.value)


def test_read_not_json_and_truncated_tail(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(make_row(1)) + "\n" + '{"id": "q2", "datas')
    with pytest.raises(PredictionsError, match=r"p\.jsonl:2: not valid JSON"):
        read_predictions(path)
    assert len(read_predictions(path, skip_truncated_tail=True)) == 1


@pytest.mark.parametrize(
    "change,match",
    [
        ({"generation": "greedy"}, "'generation' must be an object"),
        ({"prediction": None}, "'prediction' must be a string"),
        ({"answer": None}, "'answer' must be a string or number"),
        ({"image": 3}, "'image' must be"),
        ({"id": True}, "'id' must be"),
    ],
)
def test_validate_types(change, match):
    with pytest.raises(PredictionsError, match=match):
        validate_row(make_row(**change), "f.jsonl", 7)


def test_validate_non_object():
    with pytest.raises(PredictionsError, match="f.jsonl:1: a row must be a JSON object"):
        validate_row([1, 2], "f.jsonl", 1)


def test_required_keys_match_design():
    assert set(REQUIRED_KEYS) == {
        "id", "dataset", "split", "image", "question", "answer", "answer_type", "prediction",
        "checkpoint", "generation",
    }  # fmt: skip
