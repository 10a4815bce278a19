"""MedEvalKit's judge_multi_choice as medtune reproduces it (medtune.eval.mcq), branch by branch.

EXPECTED was computed by running MedEvalKit's own ``utils/utils.py::judge_multi_choice`` (commit
9b12e3b, with mathruler 0.1.0's ``extract_boxed_content``) on these very inputs; a fuzz run of
60,000 random replies built from letters, option texts, markers, boxes, tags and blank lines
showed no disagreement. Each branch of the function is hit at least once, right and wrong.
"""

from __future__ import annotations

import pytest

from medtune.eval.mcq import (
    MCQError,
    boxed_content,
    extract_tag,
    judge_multi_choice,
    lettered,
    mcq_prompt,
    parse_response,
    score_mcq_rows,
)

C = ["CT", "MRI", "X-ray", "Ultrasound"]
# (choices as passed to the function, answer, reply, MedEvalKit's verdict, branch)
EXPECTED = [
    (lettered(C), "B", "B", True, "exact"),
    (lettered(C), "B", "b\n\nBecause the image is bright.", True, "exact"),  # first block a letter
    (lettered(C), "B", "Reasoning first.\n\nB. MRI", True, "exact"),  # last block's letter
    (lettered(C), "A", "C", False, "letter"),
    (lettered(C), "B", "The answer is B.", True, "exact"),
    (lettered(C), "B", "\\boxed{B}", True, "exact"),
    (lettered(C), "B", "\\boxed{B", False, "similarity"),  # unclosed box -> "none"
    (lettered(C), "B", "Answer: b. mri", True, "exact"),
    (lettered(C), "B", "B. MRI", True, "exact"),
    (lettered(C), "C", "B. MRI", False, "letter"),
    (lettered(C), "B", "magnetic resonance (MRI)", False, "similarity"),
    (lettered(C), "D", "ultra sound", True, "similarity"),
    (lettered(C), "A", "", True, "similarity"),  # every ratio 0 -> option A
    (lettered(C), "A", "**Answer**: A", True, "exact"),
    (lettered(C), "B", "final answer is: B", False, "similarity"),
    (lettered(C), "B", "答案:B", True, "exact"),
    (lettered(C), "B", "<answer>B</answer>", True, "exact"),
    (lettered(C), "A", "I think it's x-ray", False, "similarity"),
    (lettered(C), "C", "I think it's x-ray", True, "similarity"),
    (lettered(C), "A", "zzz", True, "similarity"),
    (lettered(["yes", "no"]), "A", "Yes.", True, "similarity"),
    (lettered(["Normal", "Nodule", "Mass"]), "B", "nodule", True, "similarity"),
    (["CT", "MRI", "X-ray"], "B", "MRI", True, "option_text"),  # raw option texts (PMC style)
    (["CT", "MRI", "X-ray"], "A", "MRI", False, "option_text"),
    (["q", "r"], "r", "b", True, "letter"),  # a letter whose choice equals a text answer
    (["CT", "MRI"], "ct", "mri scan", False, "similarity"),
]


@pytest.mark.parametrize(("choices", "answer", "reply", "right", "branch"), EXPECTED)
def test_agrees_with_medevalkit(choices, answer, reply, right, branch):
    assert judge_multi_choice(choices, answer, reply) == (right, branch)


def test_steps():
    assert (
        boxed_content("so \\boxed{a} then \\boxed{\\frac{1}{2}} ") == "\\frac{1}{2}"
    )  # the last box
    assert boxed_content("\\boxed{a") == "None" and boxed_content("no box") == "None"
    assert extract_tag("x <answer>A</answer> y <answer>B</answer>", "answer") == "A B"
    assert extract_tag("x <answer>A", "answer") == "x <answer>A" and extract_tag("", "answer") == ""
    assert parse_response("The boxed answer") == "None"  # "boxed" but no box: mathruler's "None"
    assert parse_response("My answer is: C. final answer: D") == " d"
    assert mcq_prompt("Which?", ["CT", "MRI"]) == (
        "\nQuestion: Which?\nOptions: \nA. CT\nB. MRI\n"
        "Answer with the option's letter from the given choices directly."
    )


def _row(i, pred, answer="B", **kw):
    return {
        "id": i,
        "question": "q",
        "task": "mcq",
        "choices": C,
        "answer": answer,
        "prediction": pred,
        **kw,
    }


def test_score_rows_groups():
    rows = [
        _row(1, "B", modality="CT", dataset="omni"),
        _row(2, "<answer>A</answer>", modality="CT", dataset="omni"),
        _row(3, "magnetic", modality="MR", dataset="omni"),  # no option named: similarity
        _row(4, "It is an MRI scan", answer="B", modality="MR", dataset="pmc"),
    ]
    m = score_mcq_rows(rows)
    assert m["n_mcq"] == 4 and m["n_mcq_no_option"] == 2
    right = [
        judge_multi_choice(lettered(C), r["answer"], extract_tag(r["prediction"], "answer"))[0]
        for r in rows
    ]
    assert m["mcq_accuracy"] == sum(right) / 4
    assert m["by_modality"]["CT"] == {"mcq_accuracy": 0.5, "n_mcq": 2, "n_mcq_no_option": 0}
    assert m["by_dataset"]["pmc"]["n_mcq"] == 1 and "by_subset" not in m
    assert "judge_multi_choice" in m["rules"]


def test_bad_rows_named():
    with pytest.raises(
        MCQError, match=r"f.jsonl row 1: 'answer' is 'E' \(expected one of A, B, C, D\)"
    ):
        score_mcq_rows([_row(1, "A"), _row(2, "A", answer="E")], "f.jsonl")
    with pytest.raises(MCQError, match="row 0: mcq row lacks 'choices'"):
        score_mcq_rows([{"id": 1, "answer": "A", "prediction": "A", "task": "mcq"}])
