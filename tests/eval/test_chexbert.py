"""CheXbert clinical efficacy: a tiny random labeler in the released layout, and F1 on known labels."""

from __future__ import annotations

import json

import pytest
import torch

from medtune.eval import chexbert
from medtune.eval.chexbert import (
    CONDITIONS,
    CheXbertLabeler,
    chexbert_f1,
    label_reports,
    load_chexbert,
    score_reports_chexbert,
)
from medtune.utils.errors import UserError

WORDS = "no acute cardiopulmonary process mild cardiomegaly small left pleural effusion edema . ,"


def make_tiny_chexbert(folder):
    """A folder as users have it: chexbert.pth (DataParallel keys, old position_ids) + config +
    vocab.txt. Heads 0..12 are forced to class j % 4, the No Finding head to 1; ``random.pth``
    keeps the random heads."""
    from transformers import BertConfig

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS.split()]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=24, max_position_embeddings=64,
    )  # fmt: skip
    (folder / "config.json").write_text(config.to_json_string())
    torch.manual_seed(0)
    model = CheXbertLabeler(config)
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    state["module.bert.embeddings.position_ids"] = torch.arange(64)[None]
    forced = {}
    for j in range(len(CONDITIONS)):
        n = 4 if j < 13 else 2
        cls = j % 4 if j < 13 else 1
        forced[f"module.linear_heads.{j}.weight"] = torch.zeros(n, 16)
        forced[f"module.linear_heads.{j}.bias"] = (
            torch.nn.functional.one_hot(torch.tensor(cls), n).float() * 10
        )
    torch.save({"model_state_dict": state, "epoch": 3}, folder / "random.pth")
    torch.save({"model_state_dict": {**state, **forced}, "epoch": 3}, folder / "chexbert.pth")
    return folder


@pytest.fixture(scope="module")
def tiny_chexbert(tmp_path_factory):
    return make_tiny_chexbert(tmp_path_factory.mktemp("chexbert"))


def test_forced_heads_map_positive_and_uncertain_to_one(tiny_chexbert):
    model, tok = load_chexbert(tiny_chexbert)  # the folder: chexbert.pth, config, vocab
    labels = label_reports(model, tok, ["mild cardiomegaly .", "", "no acute process"] * 2, 4)
    # head j class j % 4: 0 blank -> 0, 1 positive -> 1, 2 negative -> 0, 3 uncertain -> 1;
    # No Finding head class 1 (positive) -> 1.
    expected = [int(j % 4 in (1, 3)) for j in range(13)] + [1]
    assert labels == [expected] * 6


def test_padding_does_not_change_labels(tiny_chexbert):
    model, tok = load_chexbert(tiny_chexbert / "random.pth", tiny_chexbert)
    reports = ["edema", "small left pleural effusion , mild cardiomegaly . no acute process ."]
    alone = [label_reports(model, tok, [r])[0] for r in reports]
    assert label_reports(model, tok, reports, batch_size=2) == alone
    # And the labels are the argmax of the heads: recompute by hand for the first report.
    enc = tok(reports[:1], return_tensors="pt")
    with torch.no_grad():
        heads = model(enc["input_ids"], enc["attention_mask"])
    assert alone[0] == [int(h.argmax(1).item() in (1, 3)) for h in heads]


def test_load_errors(tiny_chexbert, tmp_path):
    with pytest.raises(UserError, match="CheXbert checkpoint not found"):
        load_chexbert(tmp_path)
    with pytest.raises(UserError, match="no vocab.txt"):
        load_chexbert(tiny_chexbert, tokenizer=tmp_path)
    bad = tmp_path / "chexbert.pth"
    torch.save({"model_state_dict": {"bert.x": torch.zeros(1)}}, bad)
    (tmp_path / "config.json").write_text((tiny_chexbert / "config.json").read_text())
    with pytest.raises(UserError, match=r"not a CheXbert state dict .*unexpected \['bert.x'\]"):
        load_chexbert(bad, tiny_chexbert)


def _labels(*positives):
    return [int(c in positives) for c in CONDITIONS]


REFS = [
    _labels("Cardiomegaly", "Edema"),
    _labels("No Finding"),
    _labels("Pleural Effusion", "Edema"),
]
HYPS = [_labels("Cardiomegaly"), _labels("No Finding", "Cardiomegaly"), _labels("Pleural Effusion", "Edema")]  # fmt: skip


def test_f1_hand_computed():
    out = chexbert_f1(HYPS, REFS)
    # Cardiomegaly TP1 FP1 -> 2/3; Edema TP1 FN1 -> 2/3; Effusion 1; No Finding 1; others 0.
    per = out["f1chexbert_per_class"]
    assert per["Cardiomegaly"] == pytest.approx(2 / 3) and per["Edema"] == pytest.approx(2 / 3)
    assert per["Pleural Effusion"] == 1.0 and per["No Finding"] == 1.0 and per["Fracture"] == 0.0
    assert out["f1chexbert_all_micro_f1"] == pytest.approx(0.8)  # TP 4, FP 1, FN 1
    assert out["f1chexbert_all_macro_f1"] == pytest.approx((10 / 3) / 14)
    assert out["f1chexbert_all_weighted_f1"] == pytest.approx(0.8)
    assert out["f1chexbert_5_micro_f1"] == pytest.approx(0.75)  # TP 3, FP 1, FN 1
    assert out["f1chexbert_5_macro_f1"] == pytest.approx((7 / 3) / 5)
    assert out["n"] == 3
    with pytest.raises(UserError, match="as many generated as reference"):
        chexbert_f1(HYPS[:2], REFS)


def test_score_reports_through_the_labeler(tiny_chexbert, monkeypatch):
    # Labels controlled per report text; everything else (loading, batching) runs for real.
    table = {f"hyp{i}": h for i, h in enumerate(HYPS)} | {f"ref{i}": r for i, r in enumerate(REFS)}
    real = chexbert.label_reports
    calls = []

    def fake(model, tok, reports, batch_size=16):
        calls.append(real(model, tok, reports, batch_size))  # the real path runs too
        return [table[r] for r in reports]

    monkeypatch.setattr(chexbert, "label_reports", fake)
    out = score_reports_chexbert(
        [f"hyp{i}" for i in range(3)], [f"ref{i}" for i in range(3)], tiny_chexbert, batch_size=2
    )
    assert out["f1chexbert_all_micro_f1"] == pytest.approx(0.8)
    assert out["f1chexbert_5_macro_f1"] == pytest.approx((7 / 3) / 5)
    assert len(calls) == 2 and all(len(c) == 3 for c in calls)
    json.dumps(out)  # JSON-serialisable
