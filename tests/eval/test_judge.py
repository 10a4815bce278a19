"""The judge: prompt, strict parser, verdict cache, kill-and-resume, summary (issue 7)."""

import json
import re

import pytest

from medtune.eval import judge as J
from medtune.eval.judge import (
    DEFAULT_PROMPT_TEMPLATE,
    LocalJudge,
    VerdictStore,
    cohen_kappa,
    parse_verdict,
    prompt_sha256,
    render_prompt,
    row_key,
    run_judge,
    summarize,
    summary_markdown,
)

from .conftest import pred_row


@pytest.mark.parametrize(
    "reply,verdict",
    [
        ("RIGHT", "RIGHT"),
        ("WRONG", "WRONG"),
        ("Right.", "RIGHT"),
        ("WRONG - the right answer is X", "WRONG"),
        ("not right", "UNPARSED"),
        ("", "UNPARSED"),
        (None, "UNPARSED"),
        ("   \n  ", "UNPARSED"),
        ("RIGHT\nWRONG", "RIGHT"),
        ("  \n\tRIGHT", "RIGHT"),
        ("right", "RIGHT"),
        ("wrong.", "WRONG"),
        ("**RIGHT**", "RIGHT"),
        ('"Wrong",', "WRONG"),
        ("RIGHT/WRONG", "UNPARSED"),
        ("Rightly so", "UNPARSED"),
        ("The answer is RIGHT", "UNPARSED"),
        ("Correct", "UNPARSED"),
        ("WRONG: it is the liver", "WRONG"),
    ],
)
def test_parse_verdict_table(reply, verdict):
    assert parse_verdict(reply) == verdict


def test_default_prompt_and_hash():
    row = pred_row(1, "Left lung", "the left lung")
    prompt = render_prompt(DEFAULT_PROMPT_TEMPLATE, row)
    assert "Question: Question 1?" in prompt
    assert "Our answer: the left lung" in prompt
    assert "Correct answer: Left lung" in prompt
    assert "RIGHT" in prompt and "WRONG" in prompt
    h = prompt_sha256(DEFAULT_PROMPT_TEMPLATE)
    assert re.fullmatch(r"[0-9a-f]{64}", h)
    assert h == J.DEFAULT_PROMPT_SHA256
    assert prompt_sha256(DEFAULT_PROMPT_TEMPLATE + " ") != h
    # integer answers (VQA-RAD) and braces in user text are fine
    assert "Correct answer: 3" in render_prompt(DEFAULT_PROMPT_TEMPLATE, pred_row(2, 3, "{x}"))


# Replies keyed by row id, and what they parse to (see test_summary_hand_worked).
REPLIES = {
    0: "RIGHT", 1: "Right.", 2: "WRONG", 3: "right", 4: "RIGHT", 5: "WRONG", 6: "RIGHT",
    7: "wrong", 8: "maybe", 9: "WRONG",
}  # fmt: skip


def scripted_fn(calls):
    def generate_texts(prompts):
        calls.append(list(prompts))
        return [REPLIES[int(re.search(r"Question (\d+)\?", p).group(1))] for p in prompts]

    return generate_texts


def test_run_judge_summary_hand_worked(tmp_path, pred_rows):
    calls = []
    backend = LocalJudge(scripted_fn(calls), name="local:test")
    with VerdictStore(tmp_path / "verdicts.jsonl") as store:
        verdicts = run_judge(pred_rows, backend, store, batch_size=4)
    # 10 prompts in batches of 4, 4, 2 (rows 8, 9); row 8 ("maybe") is UNPARSED -> retried once
    # in a call of its own right after its batch.
    assert [len(c) for c in calls] == [4, 4, 2, 1]
    assert [v["verdict"] for v in verdicts] == [
        "RIGHT", "RIGHT", "WRONG", "RIGHT", "RIGHT", "WRONG", "RIGHT", "WRONG", "UNPARSED", "WRONG",
    ]  # fmt: skip
    assert verdicts[8]["attempts"] == 2 and verdicts[0]["attempts"] == 1
    v0 = verdicts[0]
    for key in ("id", "dataset", "answer_type", "verdict", "raw", "judge", "prompt_sha256"):
        assert key in v0
    assert v0["prompt_sha256"] == prompt_sha256(DEFAULT_PROMPT_TEMPLATE)
    assert v0["judge"] == "local:test" and v0["raw"] == "RIGHT"

    s = summarize(pred_rows, verdicts, "local:test")
    # RIGHT: rows 0,1,3,4,6 = 5; WRONG: 2,5,7,9 = 4; UNPARSED: 8 -> accuracy 5 / 9.
    assert (s["n_right"], s["n_wrong"], s["n_unparsed"]) == (5, 4, 1)
    assert s["judged_accuracy"] == pytest.approx(5 / 9)
    # slake rows 0-5: RIGHT 0,1,3,4; WRONG 2,5 -> 4/6. vqa_rad 6-9: RIGHT 6; WRONG 7,9 -> 1/3.
    assert s["by_dataset"]["slake"]["judged_accuracy"] == pytest.approx(4 / 6)
    assert s["by_dataset"]["vqa_rad"]["judged_accuracy"] == pytest.approx(1 / 3)
    assert s["by_dataset"]["vqa_rad"]["n_unparsed"] == 1
    # CLOSED rows 0,1,2,3,6,7: RIGHT 0,1,3,6; WRONG 2,7 -> 4/6. OPEN 4,5,8,9: 1 right of 3.
    assert s["by_answer_type"]["CLOSED"]["judged_accuracy"] == pytest.approx(4 / 6)
    assert s["by_answer_type"]["OPEN"]["judged_accuracy"] == pytest.approx(1 / 3)
    # Agreement on CLOSED rows. judge: 0 R, 1 R, 2 W, 3 R, 6 R, 7 W; strict: 0 R (yes/yes),
    # 1 W (yes vs no), 2 R (left/left), 3 R (no/no), 6 R, 7 W (no vs yes).
    # cells: both right {0,3,6} = 3, both wrong {7} = 1, judge R strict W {1}, judge W strict R {2}.
    # po = 4/6; p(judge R) = 4/6, p(strict R) = 4/6; pe = (2/3)^2 + (1/3)^2 = 5/9;
    # kappa = (2/3 - 5/9) / (1 - 5/9) = (1/9) / (4/9) = 0.25.
    agr = s["agreement_with_closed_accuracy_strict"]
    assert agr["n"] == 6
    assert agr["agreement_percent"] == pytest.approx(100 * 4 / 6)
    assert agr["cohen_kappa"] == pytest.approx(0.25)
    assert (agr["both_right"], agr["both_wrong"]) == (3, 1)
    assert (agr["judge_right_strict_wrong"], agr["judge_wrong_strict_right"]) == (1, 1)
    md = summary_markdown(s)
    assert "| all | 10 | 5 | 4 | 1 | 55.6 | 66.7 | 0.250 |" in md
    assert "dataset: vqa_rad" in md and "answer type: OPEN" in md


def test_cohen_kappa_edge_cases():
    # all four agree and both raters constant: pe = 1 -> kappa undefined (None), agreement 100.
    k = cohen_kappa([(True, True)] * 4)
    assert k["agreement_percent"] == 100.0 and k["cohen_kappa"] is None
    # perfect agreement with both classes: po = 1, pe = 0.5 -> kappa 1.
    assert cohen_kappa([(True, True), (False, False)])["cohen_kappa"] == pytest.approx(1.0)
    # total disagreement, balanced: po = 0, pa = pb = 0.5, pe = 0.5 -> kappa -1.
    assert cohen_kappa([(True, False), (False, True)])["cohen_kappa"] == pytest.approx(-1.0)
    assert cohen_kappa([])["n"] == 0


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_cache_hit_on_second_run(tmp_path, pred_rows):
    calls = []
    backend = LocalJudge(scripted_fn(calls), name="local:test")
    with VerdictStore(tmp_path / "v.jsonl") as store:
        run_judge(pred_rows, backend, store)
    n_calls = len(calls)
    with VerdictStore(tmp_path / "v.jsonl") as store:
        again = run_judge(pred_rows, backend, store)
    assert len(calls) == n_calls  # nothing judged again
    assert len(again) == 10 and len(_lines(tmp_path / "v.jsonl")) == 10
    # another judge name or prompt template is another cache entry
    with VerdictStore(tmp_path / "v.jsonl") as store:
        run_judge(pred_rows, LocalJudge(scripted_fn(calls), name="local:other"), store)
        run_judge(pred_rows, backend, store, template=DEFAULT_PROMPT_TEMPLATE + "\nBe strict.")
    rows = _lines(tmp_path / "v.jsonl")
    assert len(rows) == 30
    assert len({(r["judge"], r["prompt_sha256"], r["key"]) for r in rows}) == 30


def test_kill_and_resume_no_verdict_lost_or_duplicated(tmp_path, pred_rows):
    class Killed(RuntimeError):
        pass

    judged = []

    def dies_after_5(prompts):
        if len(judged) + len(prompts) > 5:
            raise Killed("judge process killed")
        judged.extend(prompts)
        return ["RIGHT"] * len(prompts)

    path = tmp_path / "verdicts.jsonl"
    with VerdictStore(path) as store, pytest.raises(Killed):
        run_judge(pred_rows, LocalJudge(dies_after_5, name="j"), store, batch_size=2)
    # batches of 2: two batches went through (4 verdicts), the third one died.
    assert len(_lines(path)) == 4
    # a writer killed mid-line leaves a torn line: it must not break or duplicate anything
    with open(path, "a") as fh:
        fh.write('{"id": 4, "dataset": "sla')

    second = []

    def fine(prompts):
        second.extend(prompts)
        return ["WRONG"] * len(prompts)

    with VerdictStore(path) as store:
        verdicts = run_judge(pred_rows, LocalJudge(fine, name="j"), store, batch_size=2)
    assert len(second) == 6  # only the rows without a verdict were judged
    rows = _lines(path)
    assert len(rows) == 10
    assert sorted(r["key"] for r in rows) == sorted(row_key(r) for r in pred_rows)
    assert [v["verdict"] for v in verdicts] == ["RIGHT"] * 4 + ["WRONG"] * 6


def test_changed_prediction_is_judged_again_and_file_compacted(tmp_path, pred_rows):
    calls = []
    backend = LocalJudge(scripted_fn(calls), name="j")
    path = tmp_path / "v.jsonl"
    with VerdictStore(path) as store:
        run_judge(pred_rows, backend, store)
    changed = [dict(r) for r in pred_rows]
    changed[2]["prediction"] = "right"  # a regenerated prediction: the cached verdict is stale
    before = sum(len(c) for c in calls)
    with VerdictStore(path) as store:
        verdicts = run_judge(changed, backend, store)
    assert sum(len(c) for c in calls) == before + 1
    rows = _lines(path)
    assert len(rows) == 10  # compacted: one row per key
    assert verdicts[2]["input_sha256"] != ""


def test_duplicate_rows_rejected(tmp_path):
    rows = [pred_row(1, "yes", "yes"), pred_row(1, "yes", "no")]
    with VerdictStore(tmp_path / "v.jsonl") as store, pytest.raises(ValueError, match="duplicate"):
        run_judge(rows, LocalJudge(lambda p: ["RIGHT"] * len(p)), store)


def test_same_id_in_two_checkpoints_is_two_verdicts(tmp_path):
    rows = [pred_row(1, "yes", "yes", checkpoint="a"), pred_row(1, "yes", "no", checkpoint="b")]
    with VerdictStore(tmp_path / "v.jsonl") as store:
        verdicts = run_judge(rows, LocalJudge(lambda p: ["RIGHT"] * len(p)), store)
    assert len({v["key"] for v in verdicts}) == 2


def test_local_judge_checks_count():
    with pytest.raises(RuntimeError, match="returned 1 texts for 2 prompts"):
        LocalJudge(lambda p: ["RIGHT"]).judge(["a", "b"])
    assert LocalJudge(lambda p: []).judge([]) == []


def test_corrupt_verdicts_file_names_line(tmp_path):
    path = tmp_path / "v.jsonl"
    path.write_text('{"judge": "j", "prompt_sha256": "h", "key": "k"}\nnot json\n')
    with pytest.raises(
        J.VerdictsFileError, match=r"v\.jsonl:2: not a verdict row \(not valid JSON"
    ):
        VerdictStore(path)
    path.write_text('{"judge": "j", "prompt_sha256": "h", "key": "k"}\n{"judge": "j"}\n')
    with pytest.raises(
        J.VerdictsFileError, match=r"v\.jsonl:2: not a verdict row \(no 'prompt_sha256'\)"
    ):
        VerdictStore(path)
