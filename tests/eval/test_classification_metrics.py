"""Classification metrics: AUROC, MAVL's max-F1 rule and validation thresholds on hand cases."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medtune.eval.classification_metrics import (
    ClassificationRowError,
    read_classification_rows,
    score_classification_rows,
)


def _rows(labels, scores, split="test"):
    out = []
    for i, (lab, sc) in enumerate(zip(labels, scores)):
        out.append(
            {"id": f"{split}{i}", "dataset": "toy", "split": split, "image": f"{i}.png",
             "labels": lab, "scores": sc}
        )  # fmt: skip
    return out


# Class A: y [0,0,1,1], s [.1,.4,.35,.8]; B: all 0 (skipped); C: y [1,0,-,1], s [.9,.2,.5,.6]
# (row 2 has no C label: CheXpert "ignore").
TEST = _rows(
    [{"A": 0, "B": 0, "C": 1}, {"A": 0, "B": 0, "C": 0}, {"A": 1, "B": 0}, {"A": 1, "B": 0, "C": 1}],
    [{"A": 0.1, "B": 0.3, "C": 0.9}, {"A": 0.4, "B": 0.1, "C": 0.2},
     {"A": 0.35, "B": 0.2, "C": 0.5}, {"A": 0.8, "B": 0.9, "C": 0.6}],
)  # fmt: skip
VAL = _rows(
    [{"A": 0, "C": 0}, {"A": 1, "C": 1}, {"A": 1}],
    [{"A": 0.2, "C": 0.7}, {"A": 0.3, "C": 0.5}, {"A": 0.9, "C": 0.0}],
    split="validation",
)


def test_hand_computed():
    out = score_classification_rows(TEST)
    # A: AUROC 3/4 (0.35 loses to 0.4). PR points (t: P, R, F1): .1: .5 1 .667; .35: .667 1 .8;
    # .4: .5 .5 .5; .8: 1 .5 .667 -> max .8 at .35; acc of s > .35: [0,1,0,1] vs [0,0,1,1] = .5.
    a = out["per_class"]["A"]
    assert a["auroc"] == pytest.approx(0.75)
    assert a["f1_max_mavl"] == pytest.approx(0.8) and a["threshold_mavl"] == pytest.approx(0.35)
    assert a["acc_at_f1_max_mavl"] == pytest.approx(0.5)
    # C over 3 rows: AUROC 1; max F1 1 at .6; acc of s > .6: [1,0,0] vs [1,0,1] = 2/3.
    c = out["per_class"]["C"]
    assert c["n"] == 3 and c["auroc"] == 1.0 and c["threshold_mavl"] == pytest.approx(0.6)
    assert c["acc_at_f1_max_mavl"] == pytest.approx(2 / 3)
    assert out["n_classes_skipped_single_label"] == 1
    assert out["classes_skipped_single_label"] == ["B"]
    assert out["auroc"] == {"A": pytest.approx(0.75), "C": 1.0}
    assert out["auroc_macro"] == pytest.approx(0.875)
    assert out["f1_max_mavl"] == pytest.approx(0.9)
    assert out["acc_at_f1_max_mavl"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert "f1_at_val_threshold" not in out


def test_validation_threshold():
    out = score_classification_rows(TEST, VAL)
    # A val: max F1 1.0 at .3; test s >= .3 -> [0,1,1,1]: F1 4/5; s > .3 same -> acc 3/4.
    # C val (y [0,1], s [.7,.5]): max F1 2/3 at .5; test s >= .5 -> [1,0,1] = labels: F1 1, acc 1.
    assert out["per_class"]["A"]["val_threshold"] == pytest.approx(0.3)
    assert out["per_class"]["C"]["val_threshold"] == pytest.approx(0.5)
    assert out["f1_at_val_threshold"] == pytest.approx(0.9)
    assert out["acc_at_val_threshold"] == pytest.approx(0.875)
    assert out["n_classes_skipped_val"] == 0 and out["n_val"] == 3


def test_validation_equal_to_test_reproduces_mavl():
    rng = np.random.default_rng(0)
    labels = [{"x": int(v), "y": int(w)} for v, w in rng.integers(0, 2, (40, 2))]
    scores = [{"x": float(a), "y": float(b)} for a, b in rng.random((40, 2))]
    rows = _rows(labels, scores)
    out = score_classification_rows(rows, rows)
    assert out["f1_at_val_threshold"] == pytest.approx(out["f1_max_mavl"], abs=1e-12)
    assert out["acc_at_val_threshold"] == pytest.approx(out["acc_at_f1_max_mavl"], abs=1e-12)


def test_bad_rows(tmp_path):
    bad = _rows([{"A": -1}], [{"A": 0.5}])
    with pytest.raises(ClassificationRowError, match=r"labels\['A'\] is -1, expected 0 or 1"):
        score_classification_rows(bad)
    with pytest.raises(ClassificationRowError, match="has a label but no score"):
        score_classification_rows(_rows([{"A": 1}], [{}]))
    with pytest.raises(ClassificationRowError, match="appears twice"):
        score_classification_rows(TEST + TEST[:1])
    path = tmp_path / "p.jsonl"
    bad_line = json.dumps({**TEST[1], "scores": {**TEST[1]["scores"], "A": "x"}})
    path.write_text(json.dumps(TEST[0]) + "\n" + bad_line + "\n")
    with pytest.raises(ClassificationRowError, match=rf"{path}:2: scores\['A'\]"):
        read_classification_rows(path)
