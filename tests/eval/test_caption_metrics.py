"""Caption metrics through pycocoevalcap (needs java; runs offline)."""

import shutil

import pytest

from medtune.eval.caption_metrics import CAPTION_METRIC_KEYS, caption_scores

pytestmark = pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap needs java")

REFS = {
    "id1": ["A chest x-ray showing a large pleural effusion on the left side."],
    "id2": ["Axial CT of the abdomen with a hypodense liver lesion."],
    "id3": ["MRI of the brain shows a tumor in the frontal lobe."],
    "id4": ["Ultrasound of the thyroid gland with a solid nodule."],
}


def test_identical_and_disjoint_captions():
    # One call (METEOR's JVM takes seconds to start): id1, id2 identical, id3, id4 disjoint.
    preds = {
        "id1": REFS["id1"][0],
        "id2": REFS["id2"][0],
        "id3": "purple elephants dancing",
        "id4": "quantum banana",
    }
    out = caption_scores(REFS, preds, per_item=True)
    assert out["n"] == 4
    for key in CAPTION_METRIC_KEYS:
        assert isinstance(out[key], float)
    per = out["per_id"]
    for i in ("id1", "id2"):
        assert per[i]["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
        assert per[i]["METEOR"] == pytest.approx(1.0, abs=1e-6)
        assert per[i]["ROUGE-L"] == pytest.approx(1.0)
        assert per[i]["CIDEr"] > 0
    for i in ("id3", "id4"):
        assert per[i]["BLEU-1"] < 1e-6
        assert per[i]["METEOR"] == pytest.approx(0.0, abs=1e-6)
        assert per[i]["ROUGE-L"] == 0.0
        assert per[i]["CIDEr"] == 0.0


def test_all_identical_without_meteor():
    out = caption_scores(REFS, {k: v[0] for k, v in REFS.items()}, meteor=False)
    assert out["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
    assert out["ROUGE-L"] == pytest.approx(1.0)
    assert out["CIDEr"] > 0
    assert out["METEOR"] is None


def test_all_disjoint_and_empty_prediction():
    preds = {"id1": "", "id2": "zebra", "id3": "quantum banana", "id4": "purple"}
    out = caption_scores(REFS, preds, meteor=False)
    assert out["BLEU-1"] < 1e-6
    assert out["ROUGE-L"] == 0.0
    assert out["CIDEr"] == 0.0


def test_ids_must_match():
    with pytest.raises(ValueError, match="same ids"):
        caption_scores(REFS, {"id1": "x"})
