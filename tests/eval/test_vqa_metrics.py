"""Hand-worked cases for medtune's VQA metrics (issue 6, "Scoring").

Every expected value is worked out by hand in the comment next to it, never by the code under test.
"""

import pytest

from medtune.eval import vqa_metrics as vm
from medtune.eval.vqa_metrics import (
    closed_llava_med,
    closed_strict,
    hit_llava_med,
    llava_med_normalize,
    normalize,
    open_exact,
    recall_llava_med,
    score_predictions,
    token_f1,
    tokens,
)


def test_normalize_and_tokens():
    # lowercase; "," "." "-" "?" become spaces; whitespace collapsed; stripped.
    assert normalize("  Chest X-ray, PA view?  ") == "chest x ray pa view"
    assert tokens("Yes.") == ["yes"]
    # underscore is not a letter or digit -> space.
    assert normalize("T2_weighted") == "t2 weighted"
    # integers (VQA-RAD) are str()-ed; None is empty.
    assert normalize(2) == "2"
    assert normalize(None) == ""
    # non-ASCII letters are letters: kept (SLAKE has Chinese rows).
    assert normalize("肝脏。") == "肝脏"


# (prediction, answer, strict, llava_med) for CLOSED rows; hand-worked.
CLOSED_CASES = [
    # case: both normalize to "yes" -> strict 1; llava: "yes" holds "yes" and "yes" -> 1.
    ("YES", "Yes", 1, 1),
    # "yes." vs "yes": normalize("yes.") = "yes" == "yes" -> 1; llava: period (not before a digit)
    # deleted -> "yes" -> 1.
    ("yes.", "yes", 1, 1),
    # "yes, there is" vs "no": strict: "yes there is" != "no", first token "yes" != "no" -> 0.
    # llava: ", " is a comma next to a space -> commas deleted -> "yes there is": holds "yes" (gate
    # passes) but not "no" -> 0.
    ("yes, there is", "no", 0, 0),
    # answer yes, long prediction: strict first token "yes" == "yes" -> 1; llava "yes there is"
    # holds "yes" -> 1.
    ("yes, there is", "yes", 1, 1),
    # "No, it is not." vs "no": strict first token "no" -> 1; llava "no it is not" holds "no" -> 1.
    ("No, it is not.", "no", 1, 1),
    # LLaVA-Med substring quirk: "I don't know" -> llava "i don't know" ("'" is not in the VQA
    # list); "know" holds "no" -> gate passes and "no" is a substring -> 1. strict: tokens
    # "i don t know", first token "i" != "no" -> 0.
    ("I don't know", "no", 0, 1),
    # "yesterday": strict first token "yesterday" != "yes" -> 0; llava holds "yes" twice over -> 1.
    ("yesterday", "yes", 0, 1),
    # non-yes/no closed answer "left": strict equal -> 1; llava: "left" holds neither "yes" nor
    # "no" -> gate fails -> 0 (why LLaVA-Med's closed accuracy is not accuracy on such rows).
    ("Left", "left", 1, 0),
    # "T2" vs "T2": strict 1; llava "t2" has no yes/no -> 0.
    ("T2", "T2", 1, 0),
    # "The left kidney, not the right" vs "left": strict: answer not yes/no and strings differ ->
    # 0. llava: ", " -> commas deleted; articles dropped -> "left kidney not right"; "not" holds
    # "no" -> gate passes; "left" is a substring -> 1.
    ("The left kidney, not the right", "left", 0, 1),
    # empty prediction: strict "" != "yes", no first token -> 0; llava "" holds nothing -> 0.
    ("", "yes", 0, 0),
    # "no" vs "yes": strict 0; llava gate passes ("no") but "yes" not in "no" -> 0.
    ("no", "yes", 0, 0),
]


@pytest.mark.parametrize("pred,answer,strict,llava", CLOSED_CASES)
def test_closed_cases(pred, answer, strict, llava):
    assert closed_strict(pred, answer) == bool(strict)
    assert closed_llava_med(pred, answer) == bool(llava)


# (prediction, answer, exact, f1, llava_recall, llava_hit) for OPEN rows; hand-worked.
OPEN_CASES = [
    # case + punctuation: normalize both -> "chest x ray": exact 1, f1 1. llava: "-" not next to a
    # space -> becomes a space -> "chest x ray" both -> recall 1 (tp 3, fn 0), hit 1.
    ("Chest X-ray", "chest x-ray", 1, 1.0, 1.0, 1),
    # numbers: "two" vs "2": tokens {"two"} vs {"2"} share nothing -> exact 0, f1 0. llava:
    # number table maps "two" -> "2": recall tp 1 / (1 + 0) = 1, hit "2" in "2" -> 1.
    ("two", "2", 0, 0.0, 1.0, 1),
    # article: "the right lung" vs "right lung": exact 0; f1: shared 2, P 2/3, R 2/2,
    # F1 = 2*(2/3)*1/(2/3+1) = (4/3)/(5/3) = 0.8. llava drops "the" -> identical -> recall 1, hit 1.
    ("the right lung", "right lung", 0, 0.8, 1.0, 1),
    # repeated tokens: "liver liver liver" vs "liver": exact 0; f1: shared min(3,1) = 1, P 1/3,
    # R 1/1, F1 = 2*(1/3)/(4/3) = 0.5. llava recall: tp = count in prediction = 3, fn = 0 -> 1.0;
    # hit "liver" in "liver liver liver" -> 1.
    ("liver liver liver", "liver", 0, 0.5, 1.0, 1),
    # "liver liver liver" vs "liver lung": f1: shared 1, P 1/3, R 1/2, F1 = 2*(1/6)/(5/6) = 0.4.
    # llava recall: tp 3 (prediction count of "liver"), fn 1 ("lung") -> 3/4 = 0.75; hit: "liver
    # lung" not a substring -> 0.
    ("liver liver liver", "liver lung", 0, 0.4, 0.75, 0),
    # "liver" vs "liver liver": f1: shared 1, P 1/1, R 1/2, F1 = 2*(1/2)/(3/2) = 2/3. llava
    # recall: tp = prediction count 1, fn = 0 ("liver" is present) -> 1.0; hit: "liver liver"
    # not in "liver" -> 0.
    ("liver", "liver liver", 0, 2 / 3, 1.0, 0),
    # empty prediction: everything 0 (llava: prediction side has no words -> recall 0; "liver"
    # not in "").
    ("", "liver", 0, 0.0, 0.0, 0),
    # wrong answer: nothing shared -> 0 everywhere.
    ("kidney", "liver", 0, 0.0, 0.0, 0),
    # "x - ray" vs "x-ray": medtune: "x ray" both -> exact 1, f1 1. llava: in the prediction "-"
    # stands next to a space -> deleted -> "x  ray" -> "x ray"; answer "-" -> space -> "x ray":
    # recall 1, hit 1.
    ("x - ray", "x-ray", 1, 1.0, 1.0, 1),
]


@pytest.mark.parametrize("pred,answer,exact,f1,recall,hit", OPEN_CASES)
def test_open_cases(pred, answer, exact, f1, recall, hit):
    assert open_exact(pred, answer) == bool(exact)
    assert token_f1(pred, answer) == pytest.approx(f1)
    assert recall_llava_med(pred, answer) == pytest.approx(recall)
    assert hit_llava_med(pred, answer) == bool(hit)


@pytest.mark.parametrize(
    "text,expected",
    [
        # lowercase; period at the end deleted.
        ("Yes.", "yes"),
        # "-" not next to a space -> space; "," next to a space -> every comma deleted.
        ("left-lobe 1, 5", "left lobe 1 5"),
        # a comma between two digits anywhere -> every mark is deleted instead ("-" too).
        ("left-lobe 1,5", "leftlobe 15"),
        # the "next to a space" test is made on the input text, not on the text as earlier marks
        # left it: "(" has no space neighbour -> space -> "x -y-z"; "-" in the *input* has none
        # either -> spaces -> "x  y z" -> "x y z" (testing the running text would give "x yz").
        ("x(-y-z", "x y z"),
        # a period before a digit stays; the last period goes.
        ("2.5 cm.", "2.5 cm"),
        # number words and "none"; articles dropped.
        ("None of the two", "0 of 2"),
        # contractions table.
        ("dont know", "don't know"),
        # at most 32 periods deleted (re.UNICODE passed as count): 33 periods -> 1 left.
        ("yes" + "." * 33, "yes."),
        ("." * 40, "." * 8),
        # a lone article normalizes to the empty string.
        ("A", ""),
    ],
)
def test_llava_med_normalize(text, expected):
    assert llava_med_normalize(text) == expected


def _row(i, answer, prediction, answer_type, **extra):
    row = {
        "id": str(i),
        "dataset": "slake",
        "split": "test",
        "image": f"img{i}.jpg",
        "question": "q?",
        "answer": answer,
        "answer_type": answer_type,
        "prediction": prediction,
        "checkpoint": "ckpt-a",
        "generation": {"max_new_tokens": 16},
    }
    row.update(extra)
    return row


def test_score_predictions_aggregates_and_breaks_down():
    rows = [
        # CLOSED, strict 1, llava 1.
        _row(1, "yes", "Yes.", "CLOSED", language="en", modality="CT"),
        # CLOSED with stray whitespace/lowercase type; strict 1, llava 0 (non-yes/no answer).
        _row(2, "left", "left", " closed ", language="en", modality="MRI"),
        # OPEN: exact 0, f1 0.5, recall 1, hit 1 (see OPEN_CASES).
        _row(3, "liver", "liver liver liver", "OPEN", language="zh", modality="CT"),
        # OPEN: exact 1, f1 1, recall 1, hit 1.
        _row(4, 2, "2", "OPEN", dataset="vqa_rad", q_lang="en"),
        # empty answer after normalize: skipped and counted.
        _row(5, "?", "yes", "CLOSED"),
        # unknown answer type: skipped and counted.
        _row(6, "liver", "liver", "CAPTION"),
    ]
    m = score_predictions(rows)
    assert m["n_rows"] == 6
    assert m["n_closed"] == 2
    assert m["n_open"] == 2
    assert m["n_skipped_empty_answer"] == 1
    assert m["n_skipped_other_answer_type"] == 1
    # closed strict: (1 + 1) / 2 = 1.0; llava: (1 + 0) / 2 = 0.5.
    assert m["closed_accuracy_strict"] == pytest.approx(1.0)
    assert m["closed_accuracy_llava_med"] == pytest.approx(0.5)
    # open exact: (0 + 1) / 2; f1: (0.5 + 1) / 2 = 0.75; recall (1 + 1) / 2; hit (1 + 1) / 2.
    assert m["open_exact_match"] == pytest.approx(0.5)
    assert m["open_token_f1"] == pytest.approx(0.75)
    assert m["open_recall_llava_med"] == pytest.approx(1.0)
    assert m["open_hit_llava_med"] == pytest.approx(1.0)
    # breakdowns
    assert set(m["by_dataset"]) == {"slake", "vqa_rad"}
    assert m["by_dataset"]["vqa_rad"]["n_open"] == 1
    assert m["by_dataset"]["vqa_rad"]["closed_accuracy_strict"] is None  # no CLOSED rows
    assert m["by_dataset"]["slake"]["n_skipped_empty_answer"] == 1
    assert set(m["by_answer_type"]) == {"CLOSED", "OPEN", "CAPTION"}
    assert m["by_language"]["zh"]["open_token_f1"] == pytest.approx(0.5)
    # row 4 has SLAKE's q_lang instead of language: rows 1, 2 and 4 are "en"
    assert m["by_language"]["en"]["n_closed"] == 2 and m["by_language"]["en"]["n_open"] == 1
    assert m["by_modality"]["CT"]["n_closed"] == 1 and m["by_modality"]["CT"]["n_open"] == 1
    assert "by_content_type" not in m  # no row has the field
    assert m["checkpoints"] == ["ckpt-a"]
    for key in vm.METRIC_KEYS:
        assert key in m["rules"]


def test_score_predictions_empty():
    m = score_predictions([])
    assert m["n_closed"] == 0 and m["n_open"] == 0
    assert all(m[k] is None for k in vm.METRIC_KEYS)


# ---------------------------------------------------------------------------- issue 12 item 4


def _open(answer, prediction, **kw):
    return {"answer": answer, "prediction": prediction, "answer_type": "OPEN", **kw}


def test_open_hit_skips_answers_empty_under_llava_med_normalize():
    from medtune.eval.vqa_metrics import hit_llava_med

    assert hit_llava_med("", "A") is None and hit_llava_med("anything", "the") is None
    rows = [_open("A", ""), _open("the", "liver"), _open("liver", "the liver"), _open("lung", "x")]
    m = score_predictions(rows)
    assert m["n_open"] == 4 and m["n_skipped_empty_answer_llava_med"] == 2
    assert m["open_hit_llava_med"] == 0.5  # 1 hit of the 2 scorable rows, not 3 of 4
    assert m["open_exact_match"] == 0.0  # the other open metrics keep all 4 rows
    assert "n_skipped_empty_answer_llava_med" in m["rules"]


def test_cjk_characters_are_tokens_one_by_one():
    from medtune.eval.vqa_metrics import RULES, open_exact, token_f1, tokens

    assert tokens("左肺，nodule") == ["左", "肺", "nodule"]
    assert tokens("Left lung") == ["left", "lung"]
    # 2 shared of 3 predicted and 2 answer characters: P = 2/3, R = 1, F1 = 0.8
    assert token_f1("左肺叶", "左肺") == pytest.approx(0.8)
    assert token_f1("左 肺", "左肺") == 1.0 and open_exact("左 肺", "左肺")
    assert not open_exact("右肺", "左肺")
    m = score_predictions([_open("左肺", "左肺叶", language="zh")])
    assert m["open_token_f1"] == pytest.approx(0.8) and m["open_exact_match"] == 0.0
    assert "CMRC" in RULES["tokens"] and "cjk" in RULES["tokens"]


def test_llava_med_closed_rule_is_explained_and_chinese_effect_visible():
    from medtune.eval.report import markdown_table
    from medtune.eval.vqa_metrics import LLAVA_MED_CLOSED_NOTE

    rows = [
        {"answer": "Yes", "prediction": "yes", "answer_type": "CLOSED", "language": "en"},
        {"answer": "left", "prediction": "left", "answer_type": "CLOSED", "language": "en"},
        {"answer": "是", "prediction": "是", "answer_type": "CLOSED", "language": "zh"},
        {"answer": "否", "prediction": "否", "answer_type": "CLOSED", "language": "zh"},
    ]
    m = score_predictions(rows)
    zh, en = m["by_language"]["zh"], m["by_language"]["en"]
    assert zh["closed_accuracy_strict"] == 1.0 and zh["closed_accuracy_llava_med"] == 0.0
    assert zh["n_closed_not_yes_no"] == 2 == zh["n_closed"]
    assert en["closed_accuracy_llava_med"] == 0.5 and en["n_closed_not_yes_no"] == 1
    assert (
        "是/否" in LLAVA_MED_CLOSED_NOTE
        and LLAVA_MED_CLOSED_NOTE in m["rules"]["closed_accuracy_llava_med"]
    )
    md = markdown_table(["closed_accuracy_strict", "closed_accuracy_llava_med"], [[1.0, 0.5]])
    assert md.splitlines()[-1] == LLAVA_MED_CLOSED_NOTE
    assert LLAVA_MED_CLOSED_NOTE not in markdown_table(["open_token_f1"], [[0.5]])
