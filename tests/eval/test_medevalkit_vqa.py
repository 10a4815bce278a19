"""MedEvalKit's VQA accuracy (medtune.eval.medevalkit_vqa) per dataset rule.

Verdicts below follow MedEvalKit's cal_metrics of PATH_VQA / VQA_RAD / SLAKE (commit 9b12e3b);
judge_judgement and judge_close_end_vqa were checked against MedEvalKit's own functions on
30,000 random replies each (no disagreement).
"""

from __future__ import annotations

import pytest

from medtune.eval.medevalkit_vqa import judge_judgement, medevalkit_vqa_row, score_medevalkit_vqa


@pytest.mark.parametrize(
    ("answer", "reply", "right"),
    [
        ("yes", "Yes, there is.", True),
        ("no", "No.", True),
        ("no", "It is not normal", True),  # 'not' holds 'no': MedEvalKit's substring rule
        ("yes", "yes and no", False),  # both
        ("no", "I know", True),  # 'know' holds 'no': MedEvalKit's substring rule
        ("yes", "answer: no", False),
    ],
)
def test_judgement(answer, reply, right):
    assert judge_judgement(answer, reply) is right


def test_rows_by_dataset_rule():
    path = [
        {"dataset": "pathvqa", "answer": "Yes", "prediction": "\\boxed{yes}"},  # closed by answer
        {"dataset": "pathvqa", "answer": "liver", "prediction": " Liver "},  # open: em after strip
        {"dataset": "pathvqa", "answer": "liver", "prediction": "the liver"},  # open: wrong
        {"dataset": "vqa_rad", "answer": "left lung", "prediction": "<answer>left lung</answer>"},
    ]
    assert [medevalkit_vqa_row(r)["right"] for r in path] == [True, True, False, True]
    assert [medevalkit_vqa_row(r)["closed"] for r in path] == [True, False, False, False]
    slake = [
        {
            "dataset": "slake",
            "answer_type": "CLOSED",
            "answer": "Yes",
            "prediction": "yes",
        },  # 'Yes' not yes/no raw: exact rule
        {"dataset": "slake", "answer_type": "CLOSED", "answer": "Left", "prediction": "left."},
        {
            "dataset": "slake",
            "answer_type": "OPEN",
            "answer": "Liver ",
            "prediction": "liver",
        },  # answer not stripped
        {"dataset": "slake", "answer_type": "CLOSED", "answer": "no", "prediction": "No"},
    ]
    assert [medevalkit_vqa_row(r)["right"] for r in slake] == [True, True, False, True]
    m = score_medevalkit_vqa(path + slake)
    assert m["n_closed_medevalkit"] == 4 and m["n_open_medevalkit"] == 4
    assert m["accuracy_medevalkit"] == 6 / 8
    assert m["closed_accuracy_medevalkit"] == 1.0 and m["open_accuracy_medevalkit"] == 2 / 4
    # set F1: "the liver" vs "liver" = 2/3; exact rows 1; slake 'liver' vs 'liver ' = 1
    assert m["open_token_f1_medevalkit"] == pytest.approx((1 + 2 / 3 + 1 + 1) / 4)
