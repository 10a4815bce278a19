"""SLAKE and VQA-RAD readers on fixture folders that copy the real layouts and quirks."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest

from medtune.data import DataError, Message, Samples, load_image, slake, vqa_rad
from medtune.data.errors import (
    MalformedJSONError,
    MissingFieldError,
    MissingImageError,
    UnknownAnswerTypeError,
)
from medtune.testing.datasets import (
    SLAKE_FIXTURE_COUNTS,
    VQA_RAD_FIXTURE_COUNTS,
    make_slake_fixture,
)

SLAKE_FIELDS = {
    "img_id",
    "img_name",
    "question",
    "answer",
    "q_lang",
    "location",
    "modality",
    "answer_type",
    "base_type",
    "content_type",
    "triple",
    "qid",
}
VQA_RAD_FIELDS = {
    "qid",
    "phrase_type",
    "qid_linked_id",
    "image_case_url",
    "image_name",
    "image_organ",
    "evaluation",
    "question",
    "question_rephrase",
    "question_relation",
    "question_frame",
    "question_type",
    "answer",
    "answer_type",
}


def _edit(path, fn):
    rows = json.loads(path.read_text("utf-8"))
    fn(rows)
    path.write_text(json.dumps(rows, ensure_ascii=False), "utf-8")
    return rows


# ------------------------------------------------------------------------------------------ SLAKE


@pytest.mark.parametrize("split", ["train", "validation", "test"])
def test_slake_counts_per_language(slake_dir, split):
    for lang in ("en", "zh"):
        assert len(slake(slake_dir, split, lang=lang)) == SLAKE_FIXTURE_COUNTS[split][lang]
    both = slake(slake_dir, split, lang=None)
    assert len(both) == sum(SLAKE_FIXTURE_COUNTS[split].values())
    assert (
        len(slake(slake_dir.parent, split)) == SLAKE_FIXTURE_COUNTS[split]["en"]
    )  # parent works too


def test_slake_sample_schema(slake_dir):
    samples = slake(slake_dir, "train")
    assert isinstance(samples, Samples) and samples.skipped == {}
    s = samples[0]
    raw = json.loads((slake_dir / "train.json").read_text("utf-8"))[0]
    assert s.id == str(raw["qid"])
    assert s.images == [os.path.abspath(slake_dir / "imgs" / raw["img_name"])]
    assert os.path.isabs(s.images[0]) and os.path.exists(s.images[0])
    assert s.messages == [Message("user", raw["question"]), Message("assistant", raw["answer"])]
    assert set(s.meta) >= SLAKE_FIELDS
    assert s.meta["dataset"] == "slake" and s.meta["split"] == "train"
    assert s.meta["image"] == raw["img_name"] == "xmlab0/source.jpg"
    assert s.meta["language"] == "en" and s.meta["answer_type"] in ("OPEN", "CLOSED")
    assert s.meta["modality"] == raw["modality"] and s.meta["content_type"] == raw["content_type"]
    assert s.meta["question"] == raw["question"] and s.meta["answer"] == raw["answer"]


def test_slake_quirks(slake_dir):
    test = slake(slake_dir, "test")
    empty = [s for s in test if s.meta["answer"] == ""]
    assert len(empty) == 1 and empty[0].messages[1].content == ""  # kept, not a bad row
    closed = {s.meta["answer"] for s in slake(slake_dir, "train", answer_types=["CLOSED"])}
    assert {"Left", "Right", "T2"} & closed and closed - {"Yes", "No"}
    zh = slake(slake_dir, "train", lang="zh")
    assert all(s.meta["q_lang"] == "zh" for s in zh) and any(
        "病灶" in s.messages[0].content for s in zh
    )
    assert any("xmlab5" in s.meta["image"] for s in zh)  # the release's zh-train / en-test overlap


def test_slake_answer_depends_on_image(slake_dir):
    # Patient's left = image right: the lesion's side can be read off the pixels.
    for s in slake(slake_dir, "train"):
        if s.meta["content_type"] == "Position" and s.meta["answer"] in ("Left", "Right"):
            a = np.asarray(load_image(s.images[0]))[..., 0].astype(float)
            right_brighter = a[:, 40:].max() > a[:, :24].max()
            assert right_brighter == (s.meta["answer"] == "Left")


def test_slake_filters(slake_dir):
    assert {s.meta["answer_type"] for s in slake(slake_dir, "train", answer_types="open")} == {
        "OPEN"
    }
    mri = slake(slake_dir, "train", modalities=["mri"])
    assert mri and {s.meta["modality"] for s in mri} == {"MRI"}
    pos = slake(slake_dir, "train", content_types=["Position", "Organ"])
    assert pos and {s.meta["content_type"] for s in pos} == {"Position", "Organ"}
    assert len(slake(slake_dir, "val")) == SLAKE_FIXTURE_COUNTS["validation"]["en"]
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        slake(slake_dir, "dev")
    with pytest.raises(ValueError, match="unknown lang 'fr'"):
        slake(slake_dir, "train", lang="fr")
    with pytest.raises(ValueError, match="answer_types"):
        slake(slake_dir, "train", answer_types=["YESNO"])


def test_slake_deterministic_fixture(tmp_path, slake_dir):
    again = make_slake_fixture(tmp_path)
    for name in ("train.json", "test.json", "imgs/xmlab3/source.jpg"):
        assert (again / name).read_bytes() == (slake_dir / name).read_bytes()


def test_slake_missing_field_message(slake_copy):
    rows = _edit(slake_copy / "train.json", lambda r: r[3].pop("answer"))
    with pytest.raises(MissingFieldError) as e:
        slake(slake_copy, "train")
    msg = str(e.value)
    assert str(slake_copy / "train.json") in msg
    assert (
        f"row 3 (qid {rows[3]['qid']}): missing field 'answer' (expected a string or number)" in msg
    )


def test_slake_wrong_type_message(slake_copy):
    _edit(slake_copy / "train.json", lambda r: r[2].update(question=["not", "text"]))
    with pytest.raises(
        MissingFieldError,
        match=r"train\.json row 2 \(qid 2\): field 'question' is list .* \(expected a string\)",
    ):
        slake(slake_copy, "train")


def test_slake_unknown_answer_type(slake_copy):
    _edit(slake_copy / "test.json", lambda r: r[1].update(answer_type="YESNO"))
    with pytest.raises(
        UnknownAnswerTypeError,
        match=r"test\.json row 1 \(qid \d+\): unknown answer_type 'YESNO' \(expected one of OPEN, CLOSED",
    ):
        slake(slake_copy, "test")


def test_slake_missing_image(slake_copy):
    (slake_copy / "imgs" / "xmlab6" / "source.jpg").unlink()
    with pytest.raises(MissingImageError) as e:
        slake(slake_copy, "test")
    msg = str(e.value)
    assert (
        "test.json row" in msg and "(qid " in msg and "xmlab6" in msg and "image not found" in msg
    )


def test_slake_malformed_json(slake_copy):
    text = (slake_copy / "validation.json").read_text("utf-8")
    (slake_copy / "validation.json").write_text(text.replace('"answer":', '"answer"', 1), "utf-8")
    with pytest.raises(
        MalformedJSONError, match=r"validation\.json: malformed JSON at line \d+ column \d+"
    ):
        slake(slake_copy, "validation")
    (slake_copy / "validation.json").write_text('{"not": "a list"}', "utf-8")
    with pytest.raises(MalformedJSONError, match="expected a list"):
        slake(slake_copy, "validation")


def test_slake_not_a_folder(tmp_path):
    with pytest.raises(DataError, match="not a SLAKE folder"):
        slake(tmp_path)


def test_slake_duplicate_qid(slake_copy):
    _edit(slake_copy / "train.json", lambda r: r[5].update(qid=r[0]["qid"]))
    with pytest.raises(DataError, match=r"row 5 \(qid 0\): duplicate qid \(first at row 0"):
        slake(slake_copy, "train")


def test_slake_skip_bad_rows_counts(slake_copy, caplog):
    def damage(r):
        r[0].pop("answer")
        r[1]["answer_type"] = "MAYBE"
        r[2]["img_name"] = "xmlab99/source.jpg"

    _edit(slake_copy / "train.json", damage)
    with pytest.raises(DataError):
        slake(slake_copy, "train")
    with caplog.at_level(logging.INFO, logger="medtune.data"):
        samples = slake(slake_copy, "train", skip_bad_rows=True)
    n = SLAKE_FIXTURE_COUNTS["train"]["en"]
    assert len(samples) == n - 3
    assert samples.skipped == {"missing field": 1, "unknown answer_type": 1, "missing image": 1}
    assert samples.num_skipped == 3 and len(samples.errors) == 3
    line = f"slake train.json: kept {n - 3}, skipped 3 (missing field: 1, missing image: 1, unknown answer_type: 1)"
    assert samples.summary() == line
    assert any(r.levelno == logging.WARNING and r.getMessage() == line for r in caplog.records)


# ---------------------------------------------------------------------------------------- VQA-RAD


def test_vqa_rad_splits_and_quirks(vqa_rad_dir):
    raw = json.loads((vqa_rad_dir / "VQA_RAD Dataset Public.json").read_text())
    assert any(r["answer_type"] == "CLOSED " for r in raw) and any(
        isinstance(r["answer"], int) for r in raw
    )
    train, test = vqa_rad(vqa_rad_dir, "train"), vqa_rad(vqa_rad_dir, "test")
    assert (
        len(train) == VQA_RAD_FIXTURE_COUNTS["train"]
        and len(test) == VQA_RAD_FIXTURE_COUNTS["test"]
    )
    assert {s.meta["phrase_type"] for s in train} == {"freeform", "para"}
    assert {s.meta["phrase_type"] for s in test} == {"test_freeform", "test_para"}
    assert {s.meta["answer_type"] for s in train + test} == {"OPEN", "CLOSED"}
    counts = [s for s in train if s.meta["question_type"] == "COUNT"]
    assert counts and all(
        isinstance(s.meta["answer"], str) and s.meta["answer"].isdigit() for s in counts
    )
    assert all(s.messages[1].content == s.meta["answer"] for s in train)
    s = test[0]
    r = raw[int(s.id.removeprefix("vqa_rad-"))]
    assert s.id == f"vqa_rad-{r['qid']}" and set(s.meta) >= VQA_RAD_FIELDS
    assert s.images == [os.path.abspath(vqa_rad_dir / "VQA_RAD Image Folder" / r["image_name"])]
    assert s.messages[0] == Message("user", r["question"])
    assert (
        s.meta["dataset"] == "vqa_rad"
        and s.meta["split"] == "test"
        and s.meta["image"] == r["image_name"]
    )
    assert s.meta["content_type"] == r["question_type"] and s.meta["organ"] == r["image_organ"]
    closed = vqa_rad(vqa_rad_dir / "VQA_RAD Dataset Public.json", "test", answer_types=["CLOSED"])
    assert closed and all(x.meta["answer_type"] == "CLOSED" for x in closed)
    assert {x.images[0] for x in test} & {x.images[0] for x in train}  # test images also in train


def test_vqa_rad_row_without_qid_uses_index(vqa_rad_copy):
    _edit(vqa_rad_copy / "VQA_RAD Dataset Public.json", lambda r: r[1].pop("qid"))
    assert vqa_rad(vqa_rad_copy, "train")[1].id == "vqa_rad-row1"


def test_vqa_rad_bad_rows(vqa_rad_copy):
    f = vqa_rad_copy / "VQA_RAD Dataset Public.json"
    _edit(f, lambda r: r[4].update(phrase_type="paraphrase"))
    with pytest.raises(
        DataError, match=r"Public\.json row 4 \(qid 4\): unknown phrase_type 'paraphrase'"
    ):
        vqa_rad(vqa_rad_copy, "train")
    _edit(
        f, lambda r: r[4].update(phrase_type="para", answer_type=" closed\t")
    )  # whitespace/case ok
    assert len(vqa_rad(vqa_rad_copy, "train")) == VQA_RAD_FIXTURE_COUNTS["train"]
    _edit(f, lambda r: r[6].update(answer_type="OPEN-ENDED"))
    with pytest.raises(
        UnknownAnswerTypeError, match=r"row 6 \(qid 6\): unknown answer_type 'OPEN-ENDED'"
    ):
        vqa_rad(vqa_rad_copy, "train")
    _edit(f, lambda r: (r[6].update(answer_type="OPEN"), r[7].update(answer=None)))
    with pytest.raises(MissingFieldError, match=r"row 7 \(qid 7\): missing field 'answer'"):
        vqa_rad(vqa_rad_copy, "train")
    _edit(f, lambda r: r[7].update(answer=3))
    os.remove(vqa_rad_copy / "VQA_RAD Image Folder" / "synpic51774.jpg")
    with pytest.raises(
        MissingImageError, match=r"row \d+ \(qid \d+\): image not found: .*synpic51774\.jpg"
    ):
        vqa_rad(vqa_rad_copy, "test")
    samples = vqa_rad(vqa_rad_copy, "test", skip_bad_rows=True)
    assert (
        samples.skipped == {"missing image": 4}
        and len(samples) == VQA_RAD_FIXTURE_COUNTS["test"] - 4
    )
    assert samples.summary().startswith(
        "vqa_rad test (VQA_RAD Dataset Public.json): kept 4, skipped 4"
    )


def test_vqa_rad_split_and_folder_errors(vqa_rad_dir, tmp_path):
    with pytest.raises(ValueError, match="unknown split 'validation'"):
        vqa_rad(vqa_rad_dir, "validation")
    assert len(vqa_rad(vqa_rad_dir.parent, "test")) == VQA_RAD_FIXTURE_COUNTS["test"]
    with pytest.raises(DataError, match="not a VQA-RAD folder"):
        vqa_rad(tmp_path)


def test_samples_pickle_and_transform_pipeline(slake_dir):
    import pickle

    import torch

    from medtune.data import image_transform
    from medtune.data.images import CLIP_MEAN, CLIP_STD

    samples = slake(slake_dir, "validation", skip_bad_rows=True)
    back = pickle.loads(pickle.dumps(samples))
    assert isinstance(back, Samples) and back == samples and back.source == samples.source
    t = image_transform(32, CLIP_MEAN, CLIP_STD)
    x = torch.stack([t(load_image(s.images[0])) for s in samples])
    assert x.shape == (len(samples), 3, 32, 32) and x.dtype == torch.float32
