"""``medtune score`` on retrieval files, classification predictions and multi-reference captions."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys

import pytest
import torch

from medtune._cli import score
from medtune.eval.retrieval_metrics import RETRIEVAL_KEYS, save_retrieval

from .test_chexbert import make_tiny_chexbert
from .test_classification_metrics import TEST, VAL
from .test_predictions import make_row
from .test_retrieval_metrics import _random_case, blip_itm_eval


@pytest.fixture(scope="module")
def tiny_chexbert(tmp_path_factory):
    return make_tiny_chexbert(tmp_path_factory.mktemp("chexbert"))


def _parser():
    parser = argparse.ArgumentParser(prog="medtune")
    score.register(parser.add_subparsers(dest="command", required=True))
    return parser


def _run(argv, capsys):
    args = _parser().parse_args(["score", *argv])
    status = args.func(args)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_retrieval_file_through_medtune_main(tmp_path):
    sim, txt2img, img2txt = _random_case(30, 3, 5)
    sim_t2i = sim.T + 0.5 * torch.randn(sim.T.shape, generator=torch.Generator().manual_seed(1))
    path = save_retrieval(tmp_path / "retrieval.safetensors", sim, txt2img, sim_t2i=sim_t2i)
    out = tmp_path / "m" / "retrieval.json"
    run = subprocess.run(
        [sys.executable, "-m", "medtune._cli.main", "score", str(path), "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    printed = json.loads(run.stdout)
    assert printed == json.loads(out.read_text())
    assert tuple(printed) == RETRIEVAL_KEYS  # exactly BLIP's keys, nothing added
    ref = blip_itm_eval(sim.float().numpy(), sim_t2i.float().numpy(), txt2img.numpy(), img2txt)
    assert printed == pytest.approx(ref, abs=1e-9)


def test_bad_retrieval_file(tmp_path, capsys):
    from safetensors.torch import save_file

    path = tmp_path / "r.safetensors"
    save_file({"sim_i2t": torch.zeros(2, 3), "txt2img": torch.tensor([0, 1, 5])}, str(path))
    status, _, err = _run([str(path)], capsys)
    assert status == 2
    assert err.startswith(f"medtune: error: {path}: txt2img holds image indices in [0, 5]")
    assert "Traceback" not in err


def test_classification_with_val(tmp_path, capsys):
    test = _write(tmp_path / "test.jsonl", TEST)
    val = _write(tmp_path / "val.jsonl", VAL)
    status, out, err = _run([str(test), "--val", str(val)], capsys)
    assert status == 0, err
    m = json.loads(out)
    # The hand-computed numbers of tests/eval/test_classification_metrics.py.
    assert m["auroc_macro"] == pytest.approx(0.875)
    assert m["auroc"] == {"A": pytest.approx(0.75), "C": 1.0}
    assert m["n_classes_skipped_single_label"] == 1
    assert m["f1_max_mavl"] == pytest.approx(0.9)
    assert m["acc_at_f1_max_mavl"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert m["f1_at_val_threshold"] == pytest.approx(0.9)
    assert m["acc_at_val_threshold"] == pytest.approx(0.875)
    assert m["val_predictions"] == str(val) and "closed_accuracy_strict" not in m
    status, out, _ = _run([str(test)], capsys)
    assert status == 0 and "f1_at_val_threshold" not in json.loads(out)


def test_classification_errors(tmp_path, capsys):
    mixed = _write(tmp_path / "mixed.jsonl", TEST[:2] + [make_row(1)])
    status, _, err = _run([str(mixed)], capsys)
    assert status == 2 and "2 classification row(s) (labels and scores) and 1 other" in err
    vqa = _write(tmp_path / "vqa.jsonl", [make_row(1)])
    status, _, err = _run([str(vqa), "--val", str(vqa)], capsys)
    assert status == 2 and "--val is for classification predictions" in err
    status, _, err = _run([str(vqa), "--val", str(tmp_path / "nope.jsonl")], capsys)
    assert status == 2 and "validation predictions file not found" in err
    bad = _write(tmp_path / "bad.jsonl", [TEST[0], {**TEST[1], "labels": {"A": 2, "B": 0}}])
    status, _, err = _run([str(bad)], capsys)
    assert status == 2 and f"{bad}:2: labels['A'] is 2, expected 0 or 1" in err
    assert "Traceback" not in err


def _caption_row(i, answer, prediction):
    row = make_row(i, answer="x", prediction=prediction, answer_type="CAPTION")
    return {**row, "answer": answer, "task": "caption"}


@pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap needs java")
def test_caption_references_list_and_per_row(tmp_path, capsys):
    a = "the heart size is normal and the lungs are clear"
    b = "small left pleural effusion with basilar atelectasis"
    pred = _write(
        tmp_path / "reports.jsonl",
        [
            _caption_row(1, a, a),
            _caption_row(2, ["no acute cardiopulmonary process is seen", b], b),
            _caption_row(3, ["moderate cardiomegaly"], "fracture of the left clavicle"),
        ],
    )
    per_row = tmp_path / "per_row.jsonl"
    status, out, err = _run([str(pred), "--no-meteor", "--per-row", str(per_row)], capsys)
    assert status == 0, err
    m = json.loads(out)
    assert m["n"] == 3 and "per_id" not in m and 0 < m["BLEU-1"] < 1
    rows = [json.loads(line) for line in per_row.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["q1", "q2", "q3"]
    by_id = {r["id"]: r for r in rows}
    for rid in ("q1", "q2"):  # r2 matches its second reference exactly
        assert by_id[rid]["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
        assert by_id[rid]["ROUGE-L"] == pytest.approx(1.0)
    assert by_id["q3"]["BLEU-1"] < 1e-6 and by_id["q3"]["ROUGE-L"] == 0.0
    assert by_id["q1"]["METEOR"] is None and by_id["q1"]["dataset"] == "slake"
    # The corpus ROUGE-L is the mean of the per-row values.
    assert m["ROUGE-L"] == pytest.approx(sum(r["ROUGE-L"] for r in rows) / 3)


def test_per_row_needs_a_caption_file(tmp_path, capsys):
    vqa = _write(tmp_path / "vqa.jsonl", [make_row(1)])
    status, _, err = _run([str(vqa), "--per-row", str(tmp_path / "x.jsonl")], capsys)
    assert status == 2 and "--per-row is for caption files" in err
    assert not (tmp_path / "x.jsonl").exists()
    bad = _write(tmp_path / "cap.jsonl", [_caption_row(1, [], "x")])
    status, _, err = _run([str(bad)], capsys)
    assert status == 2 and "'answer' must be the reference text or a non-empty list" in err


@pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap needs java")
def test_caption_file_with_chexbert(tmp_path, capsys, tiny_chexbert):
    # The tiny labeler's heads are forced, so every report gets the same labels: F1 is that of
    # identical label sets (1 for each positive class, 0 for the others).
    pred = _write(
        tmp_path / "reports.jsonl",
        [_caption_row(1, ["mild cardiomegaly", "x"], "edema"), _caption_row(2, "no acute", "")],
    )
    status, out, err = _run([str(pred), "--no-meteor", "--chexbert", str(tiny_chexbert)], capsys)
    assert status == 0, err
    ch = json.loads(out)["chexbert"]
    positive = [c for c, v in ch["f1chexbert_per_class"].items() if v == 1.0]
    assert len(positive) == 7  # heads 1, 3, 5, 7, 9, 11 (positive / uncertain) + No Finding
    assert ch["f1chexbert_all_micro_f1"] == 1.0 and ch["f1chexbert_all_macro_f1"] == 0.5
    vqa = _write(tmp_path / "vqa.jsonl", [make_row(1)])
    status, _, err = _run([str(vqa), "--chexbert", str(tiny_chexbert)], capsys)
    assert status == 2 and "--chexbert is for report (caption) files" in err
