"""``medtune score --charts``: bar charts, ROC curves and report pages for scored files."""

from __future__ import annotations

import json
import re

import numpy as np
from PIL import Image

from medtune._cli.main import main
from medtune.eval.judge.store import row_key
from medtune.viz.eval_outputs import write_eval_figures


def _vqa_rows():
    rows = []
    for i in range(8):
        closed = i % 2 == 0
        answer = "yes" if closed else f"organ {i}"
        rows.append(
            {"id": i, "dataset": "vqa_rad", "split": "test", "image": f"img{i % 3}.png",
             "question": f"q{i}?", "answer": answer, "answer_type": "CLOSED" if closed else "OPEN",
             "prediction": answer if i % 3 else "no", "checkpoint": "runs/a/epoch_1",
             "generation": {}, "modality": "CT"}
        )  # fmt: skip
    return rows


def _page_json(path):
    text = path.read_text()
    blob = re.search(r'<script type="application/json" id="data">(.*?)</script>', text, re.S)
    return json.loads(blob.group(1))


def test_score_charts_for_vqa_with_judge(tmp_path, capsys):
    rows = _vqa_rows()
    pred = tmp_path / "predictions.jsonl"
    pred.write_text("".join(json.dumps(r) + "\n" for r in rows))
    verdicts = tmp_path / "verdicts.jsonl"
    verdicts.write_text(
        "".join(
            json.dumps({"key": row_key(r), "verdict": "WRONG" if r["id"] == 1 else "RIGHT",
                        "judge": "j", "prompt_sha256": "x"}) + "\n"
            for r in rows[:4]
        )
    )  # fmt: skip
    out = tmp_path / "charts"
    argv = ["score", str(pred), "--charts", str(out), "--judge", str(verdicts)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    metrics = json.loads(captured.out)  # stdout is still exactly the metrics JSON
    assert f"wrote {out / 'closed_accuracy_strict.png'}" in captured.err
    img = np.asarray(Image.open(out / "closed_accuracy_strict.png").convert("RGB"))
    assert img.shape == (600, 1000, 3) and (img < 250).any(axis=-1).mean() > 0.01
    data = _page_json(out / "report_0.html")
    assert data["rules"] == ["strict", "llava_med", "judge"]
    assert data["summary"]["closed_accuracy_strict"] == metrics["closed_accuracy_strict"]
    judged = [r["preds"]["epoch_1"]["ok"]["judge"] for r in data["rows"]]
    assert judged == [True, False, True, True, None, None, None, None]
    # the rows' images are not on disk: each cell names the missing file, none is dropped
    assert len(data["images"]) == 3
    assert all("image file not found" in v["error"] for v in data["images"].values())


def test_score_charts_for_classification(tmp_path, capsys):
    rng = np.random.default_rng(1)
    rows = []
    for i in range(40):
        labels = {"a": int(i % 2 == 0), "b": int(i % 5 == 0)}
        rows.append({"id": i, "dataset": "cxr14", "split": "test", "labels": labels,
                     "scores": {k: float(rng.random() + v) for k, v in labels.items()}})  # fmt: skip
    pred = tmp_path / "cls.jsonl"
    pred.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "charts"
    assert main(["score", str(pred), "--charts", str(out)]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert (out / "roc_0.png").is_file() and (out / "auroc_macro.png").is_file()
    assert metrics["auroc_macro"] > 0.5
    assert main(["score", str(pred), "--judge", "x.jsonl"]) == 2
    assert "--judge and --images go with --charts" in capsys.readouterr().err


def test_eval_folder_without_metrics_is_one_clear_error(tmp_path):
    import pytest

    from medtune.utils.errors import UserError

    with pytest.raises(UserError, match="no <checkpoint>/<dataset>/metrics.json"):
        write_eval_figures(tmp_path)
