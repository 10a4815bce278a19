"""``recipes/vqa_judge.py`` end to end through its config, against the scripted local server.

The first run (``python recipes/vqa_judge.py``, a subprocess) is killed with SIGKILL by the server
while it holds request K+1; the second run, through ``medtune run vqa_judge`` (in this process, as
``medtune run`` runs recipes without torchrun flags), resumes: every row ends with exactly one
verdict.
"""

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from medtune._cli.main import main

from .conftest import write_jsonl

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "vqa_judge.py"
CONFIG = REPO / "recipes" / "configs" / "vqa_judge" / "openai_compatible.yaml"

pytestmark = pytest.mark.slow


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_recipe_kill_and_resume_end_to_end(tmp_path, judge_server, pred_rows, capsys):
    # two predictions files (two checkpoints, same question ids)
    a = write_jsonl(tmp_path / "a.jsonl", pred_rows)
    b = write_jsonl(
        tmp_path / "b.jsonl", [{**r, "checkpoint": "ck2", "prediction": "no"} for r in pred_rows]
    )
    out = tmp_path / "judge_out"
    overrides = [
        f"predictions=[{a},{b}]",
        f"output_dir={out}",
        f"judge.base_url={judge_server.base_url}",
        "judge.model=test",
        "judge.concurrency=1",
        "judge.backoff_s=0.01",
        "batch_size=1",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    # Run 1: the server kills the recipe while holding request K + 1 = 8 (after 7 verdicts; one
    # 500 on the way is retried).
    k = 7
    judge_server.script = [("status", 500)]
    proc_box = {}
    killed = threading.Event()

    def kill_at(n, prompt):
        if n == k + 2:  # request 1 was the scripted 500
            os.kill(proc_box["proc"].pid, signal.SIGKILL)
            killed.set()
            return "abort"
        return None

    judge_server.on_request = kill_at
    proc = subprocess.Popen(
        [sys.executable, str(RECIPE), "--config", str(CONFIG), *overrides],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    proc_box["proc"] = proc
    stdout, stderr = proc.communicate(timeout=120)
    assert killed.is_set(), stdout + stderr
    assert proc.returncode == -signal.SIGKILL
    verdicts_path = out / "verdicts.jsonl"
    assert len(_lines(verdicts_path)) == k
    assert not (out / "summary.json").exists()

    # Run 2 through the medtune CLI: resumes, judging only the 20 - 7 rows without a verdict.
    judge_server.on_request = None
    before = judge_server.n_requests
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "vqa_judge", "--config", "openai_compatible", *overrides])
    stdout = capsys.readouterr().out
    assert exit_info.value.code == 0, stdout
    assert judge_server.n_requests - before == 20 - k
    rows = _lines(verdicts_path)
    assert len(rows) == 20
    assert len({r["key"] for r in rows}) == 20  # no verdict lost or duplicated
    for r in rows:
        assert r["judge"] == "openai:test" and len(r["prompt_sha256"]) == 64

    summary = json.loads((out / "summary.json").read_text())
    # ck1 (a.jsonl): 6 rows with prediction == answer -> RIGHT, 4 WRONG.
    # ck2 (b.jsonl): every prediction is "no": right only for rows 1 and 3 (answer "no").
    assert summary["n_right"] == 6 + 2 and summary["n_wrong"] == 4 + 8
    assert summary["n_unparsed"] == 0
    assert summary["judged_accuracy"] == pytest.approx(8 / 20)
    assert summary["by_checkpoint"]["ck1"]["judged_accuracy"] == pytest.approx(6 / 10)
    # the server judges like closed_accuracy_strict on these CLOSED rows: full agreement
    agr = summary["agreement_with_closed_accuracy_strict"]
    assert agr["n"] == 12 and agr["agreement_percent"] == pytest.approx(100.0)
    assert agr["cohen_kappa"] == pytest.approx(1.0)
    md = (out / "summary.md").read_text()
    assert "| all | 20 | 8 | 12 | 0 | 40.0 | 100.0 | 1.000 |" in md
    assert "# VQA judge summary" in stdout
