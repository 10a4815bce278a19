"""``medtune score``: the sub-command registered by medtune._cli.score."""

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from medtune._cli import score

from .test_predictions import make_row

REPO = Path(__file__).resolve().parents[2]


def _parser():
    parser = argparse.ArgumentParser(prog="medtune")
    score.register(parser.add_subparsers(dest="command", required=True))
    return parser


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_score_one_file(tmp_path, capsys):
    pred = _write(
        tmp_path / "p.jsonl",
        [
            make_row(1, answer="yes", prediction="Yes, it is."),  # strict 1, llava 1
            make_row(2, answer="no", prediction="yes"),  # strict 0, llava 0
            make_row(3, answer="liver", prediction="the liver", answer_type="OPEN"),
            make_row(4, answer="", prediction="x", answer_type="OPEN"),  # skipped
        ],
    )
    out = tmp_path / "sub" / "metrics.json"
    args = _parser().parse_args(["score", str(pred), "--out", str(out)])
    assert args.func(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text())
    assert printed["predictions"] == str(pred)
    assert printed["n_closed"] == 2 and printed["n_open"] == 1
    assert printed["n_skipped_empty_answer"] == 1
    assert printed["closed_accuracy_strict"] == pytest.approx(0.5)  # (1 + 0) / 2
    # "the liver" vs "liver": medtune exact 0; llava drops "the" -> hit 1.
    assert printed["open_exact_match"] == 0.0
    assert printed["open_hit_llava_med"] == 1.0
    assert "rules" in printed and "by_language" in printed


def test_score_two_files(tmp_path, capsys):
    a = _write(tmp_path / "a.jsonl", [make_row(1)])
    b = _write(tmp_path / "b.jsonl", [make_row(1, prediction="no")])
    args = _parser().parse_args(["score", str(a), str(b)])
    assert args.func(args) == 0
    files = json.loads(capsys.readouterr().out)["files"]
    assert files[str(a)]["closed_accuracy_strict"] == 1.0
    assert files[str(b)]["closed_accuracy_strict"] == 0.0


def test_missing_file(tmp_path, capsys):
    args = _parser().parse_args(["score", str(tmp_path / "nope.jsonl")])
    assert args.func(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("medtune: error: predictions file not found")
    assert "Traceback" not in err


def test_malformed_row(tmp_path, capsys):
    row = make_row(1)
    del row["answer"]
    pred = _write(tmp_path / "p.jsonl", [make_row(0), row])
    args = _parser().parse_args(["score", str(pred)])
    assert args.func(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("medtune: error: ") and f"{pred}:2" in err and "'answer'" in err


def test_score_module_is_import_light():
    code = (
        "import sys, medtune._cli.score, medtune.eval.vqa_metrics, medtune.eval.predictions, "
        "medtune.eval.judge, medtune.eval.caption_metrics; "
        "print(sorted(m for m in ('torch', 'torchtune', 'pycocoevalcap') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_through_medtune_main(tmp_path):
    if not (REPO / "medtune" / "_cli" / "main.py").exists():
        pytest.skip("medtune._cli.main not written yet")
    pred = _write(tmp_path / "p.jsonl", [make_row(1)])
    ok = subprocess.run(
        [sys.executable, "-m", "medtune._cli.main", "score", str(pred)],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["closed_accuracy_strict"] == 1.0
    bad = subprocess.run(
        [sys.executable, "-m", "medtune._cli.main", "score", str(tmp_path / "missing.jsonl")],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2
    assert "medtune: error:" in bad.stderr and "Traceback" not in bad.stderr


def _caption_row(i, answer, prediction):
    return {
        **make_row(i, answer=answer, prediction=prediction, answer_type="CAPTION"),
        "task": "caption",
    }


@pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap needs java")
def test_score_caption_file(tmp_path, capsys):
    same = "axial ct of the abdomen shows a lesion in the liver"
    pred = _write(
        tmp_path / "cap.jsonl",
        [
            _caption_row(1, same, same),
            _caption_row(2, "chest x ray with a right lower lobe opacity", "brain mri"),
        ],
    )
    args = _parser().parse_args(["score", str(pred), "--no-meteor"])
    assert args.func(args) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["n"] == 2 and m["METEOR"] is None and "closed_accuracy_strict" not in m
    assert 0.4 < m["BLEU-1"] < 1.0  # one perfect caption, one with no shared word
    assert 0.4 < m["ROUGE-L"] < 0.6  # mean of 1 and 0


def test_mixed_caption_and_vqa_rows_are_refused(tmp_path, capsys):
    pred = _write(tmp_path / "mixed.jsonl", [make_row(1), _caption_row(2, "a", "b")])
    args = _parser().parse_args(["score", str(pred)])
    assert args.func(args) == 2
    err = capsys.readouterr().err
    assert "1 caption row(s) and 1 VQA row(s)" in err and "Traceback" not in err
