"""One results table (medtune.eval.results) for checkpoints x datasets of every task and backend,
with per-group breakdowns, in Markdown, CSV and JSON; and ``medtune score`` on an mcq file."""

from __future__ import annotations

import csv
import json

from medtune._cli.main import main
from medtune.eval.mcq import score_mcq_rows
from medtune.eval.medevalkit_vqa import score_medevalkit_vqa
from medtune.eval.results import write_results
from medtune.eval.vqa_metrics import score_predictions

CHOICES = ["CT", "MRI", "X-ray"]


def _mcq(i, pred, answer, modality):
    return {"id": i, "question": "q", "task": "mcq", "choices": CHOICES, "answer": answer,
            "prediction": pred, "modality": modality, "dataset": "omni"}  # fmt: skip


def _vqa(i, pred, answer, at):
    return {"id": i, "question": "q", "answer": answer, "answer_type": at, "prediction": pred,
            "dataset": "pathvqa"}  # fmt: skip


def test_table_several_backends_with_groups(tmp_path):
    mcq_a = [_mcq(1, "A", "A", "CT"), _mcq(2, "C", "B", "CT"), _mcq(3, "B", "B", "MR")]
    mcq_b = [_mcq(1, "B", "A", "CT"), _mcq(2, "B", "B", "CT"), _mcq(3, "B", "B", "MR")]
    vqa = [
        _vqa(1, "yes", "yes", "CLOSED"),
        _vqa(2, "liver", "liver", "OPEN"),
        _vqa(3, "no", "yes", "CLOSED"),
    ]
    results = []
    for name, model, mcq_rows in (
        ("tuned", "medtune", mcq_a),
        ("llava", "hf", mcq_b),
        ("served", "openai", mcq_a),
    ):
        results.append({"checkpoint": name, "model": model, "dataset": "omni", "task": "mcq",
                        "metrics": score_mcq_rows(mcq_rows)})  # fmt: skip
        results.append({"checkpoint": name, "model": model, "dataset": "pathvqa", "task": "vqa",
                        "metrics": score_predictions(vqa) | score_medevalkit_vqa(vqa)})  # fmt: skip
    md = write_results(
        tmp_path, results, {"tuned": "runs/a/epoch_0", "llava": "/m/llava", "served": "openai:x@u"}
    )
    with open(tmp_path / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [(r["checkpoint"], r["model"], r["dataset"], r["task"]) for r in table] == [
        ("tuned", "medtune", "omni", "mcq"), ("tuned", "medtune", "pathvqa", "vqa"),
        ("llava", "hf", "omni", "mcq"), ("llava", "hf", "pathvqa", "vqa"),
        ("served", "openai", "omni", "mcq"), ("served", "openai", "pathvqa", "vqa"),
    ]  # fmt: skip
    assert float(table[0]["mcq_accuracy"]) == 2 / 3 and float(table[2]["mcq_accuracy"]) == 2 / 3
    assert (
        table[0]["n"] == "3" and table[1]["n"] == "3" and table[0]["closed_accuracy_strict"] == ""
    )
    assert float(table[1]["accuracy_medevalkit"]) == 2 / 3  # yes right, liver right, no != yes
    assert float(table[1]["closed_accuracy_strict"]) == 0.5
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["columns"] == list(table[0]) and len(doc["rows"]) == 6
    assert doc["checkpoints"]["llava"] == "/m/llava"
    groups = {(g["checkpoint"], g["dataset"], g["group"], g["value"]): g for g in doc["groups"]}
    assert groups[("tuned", "omni", "modality", "CT")]["mcq_accuracy"] == 0.5
    assert groups[("llava", "omni", "modality", "MR")]["n"] == 1
    assert groups[("served", "pathvqa", "answer_type", "CLOSED")]["closed_accuracy_strict"] == 0.5
    with open(tmp_path / "results_groups.csv") as f:
        assert len(list(csv.DictReader(f))) == len(doc["groups"])
    assert "Per group:" in md and md == (tmp_path / "results.md").read_text()


def test_score_cli_mcq_file(tmp_path, capsys):
    path = tmp_path / "p.jsonl"
    rows = [_mcq(1, "The answer is A.", "A", "CT"), _mcq(2, "<answer>C</answer>", "B", "MR")]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["score", str(path)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["mcq_accuracy"] == 0.5 and out["n_mcq"] == 2 and out["n_mcq_no_option"] == 0
    assert out["by_modality"]["MR"]["mcq_accuracy"] == 0.0
    rows[1]["answer"] = "Z"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["score", str(path)]) == 2
    assert "row 1: 'answer' is 'Z' (expected one of A, B, C)" in capsys.readouterr().err
