"""Scoring what others produced (issue 11 item 8) and ``medtune score ... | head`` (issue 12 item 8).

A predictions file "from another system" holds only the fields the scorers read (``id``,
``question``, ``answer``, ``answer_type``, ``prediction``) plus fields of its own; no
``generation``, no ``checkpoint``, no ``dataset``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from medtune._cli.main import main

from .conftest import write_jsonl

FOREIGN = [
    {"id": 1, "question": "Is this a CT?", "answer": "yes", "answer_type": "CLOSED",
     "prediction": "Yes.", "model": "other-vlm"},
    {"id": 2, "question": "Which organ?", "answer": "liver", "answer_type": "OPEN",
     "prediction": "the liver", "model": "other-vlm"},
    {"id": 3, "question": "Is it normal?", "answer": "no", "answer_type": "CLOSED",
     "prediction": "yes", "model": "other-vlm"},
]  # fmt: skip


def test_read_predictions_needs_only_scored_fields(tmp_path):
    from medtune.eval.predictions import PredictionsError, read_predictions

    path = write_jsonl(tmp_path / "p.jsonl", FOREIGN)
    rows = read_predictions(path)
    assert [r["dataset"] for r in rows] == ["unknown"] * 3
    assert all(r["model"] == "other-vlm" for r in rows)  # carried through
    bad = [dict(FOREIGN[0])]
    del bad[0]["prediction"]
    write_jsonl(path, bad)
    with pytest.raises(PredictionsError, match=r"p\.jsonl:1: missing key\(s\) 'prediction'"):
        read_predictions(path)
    write_jsonl(path, [{**FOREIGN[0], "generation": "greedy"}])  # present: still type-checked
    with pytest.raises(PredictionsError, match="'generation' must be an object"):
        read_predictions(path)


def test_score_a_file_from_another_system(tmp_path, capsys):
    path = write_jsonl(tmp_path / "other.jsonl", FOREIGN)
    assert main(["score", str(path)]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["n_closed"] == 2 and m["n_open"] == 1
    assert m["closed_accuracy_strict"] == 0.5 and m["open_hit_llava_med"] == 1.0
    assert list(m["by_dataset"]) == ["unknown"] and m["checkpoints"] == []


def test_vqa_judge_on_a_file_from_another_system(tmp_path, judge_server, capsys):
    path = write_jsonl(tmp_path / "other.jsonl", FOREIGN)
    out = tmp_path / "judge"
    with pytest.raises(SystemExit) as e:
        main([
            "run", "vqa_judge", "--config", "openai_compatible", f"predictions=[{path}]",
            f"output_dir={out}", f"judge.base_url={judge_server.base_url}", "judge.model=test",
            "judge.concurrency=1",
            # a field of the other system's own, used by the template: carried through
            "prompt.template='{model} said {prediction} to {question}; truth {answer}. RIGHT or WRONG?'",
        ])  # fmt: skip
    assert e.value.code in (0, None), capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n"] == 3 and list(summary["by_dataset"]) == ["unknown"]
    assert all(
        r["body"]["messages"][-1]["content"].startswith("other-vlm said")
        for r in judge_server.requests
    )
    verdicts = [json.loads(line) for line in (out / "verdicts.jsonl").read_text().splitlines()]
    assert sorted(v["id"] for v in verdicts) == [1, 2, 3]


def test_score_into_a_closed_pipe_has_no_traceback(tmp_path):
    """``medtune score ... | head -c 100``: the reader goes away early; no BrokenPipe traceback."""
    files = [
        write_jsonl(tmp_path / f"p{i}.jsonl", [{**r, "dataset": f"d{i}"} for r in FOREIGN])
        for i in range(40)
    ]  # ~40 metrics objects: far more than a pipe buffer (64 KiB)
    medtune = str(Path(sys.executable).parent / "medtune")
    proc = subprocess.Popen(
        [medtune, "score", *map(str, files)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    head = proc.stdout.read(100)
    proc.stdout.close()  # what `head` does after its bytes
    err = proc.stderr.read().decode()
    proc.wait(timeout=60)
    assert head.startswith(b"{")
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    assert err == ""  # quiet: no message at all
