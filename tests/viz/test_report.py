"""Eval's charts and report pages, from an eval folder laid out as the eval recipe writes it.

Predictions are made up (no model): two checkpoints answer the tiny SLAKE-schema test questions
right or wrong on a fixed pattern, plus one question on pydicom's real CT DICOM. The page is
opened in headless Chromium (Debian's package, as tests/serve/test_page.py does), filtered to the
wrong answers and counted against the predictions file, then screenshotted.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from medtune.data.images import load_image
from medtune.eval.judge.store import row_key
from medtune.eval.vqa_metrics import score_predictions, score_row
from medtune.viz import charts
from medtune.viz.eval_outputs import eval_pairs, write_eval_figures
from medtune.viz.report_data import page_data, thumbnail

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--no-first-run",
]
CT = Path(get_testdata_file("CT_small.dcm"))
CKPTS = ("run_a_epoch_1", "run_b_epoch_2")


def _prediction(ckpt: str, i: int, answer: str) -> str:
    if ckpt == CKPTS[0]:
        return answer if i % 3 else "certainly not"
    return answer if i % 2 else f"maybe {answer}x"


@pytest.fixture(scope="module")
def eval_dir(tiny_assets, tmp_path_factory):
    root = Path(tiny_assets) / "tiny_slake" / "Slake1.0"
    src = json.loads((root / "test.json").read_text())[:23]
    out = tmp_path_factory.mktemp("eval")
    rows_by_ckpt = {}
    for ckpt in CKPTS:
        rows = []
        for i, r in enumerate(src):
            rows.append(
                {
                    "id": r["qid"],
                    "dataset": "slake",
                    "split": "test",
                    "image": f"imgs/{r['img_name']}",
                    "question": r["question"],
                    "answer": r["answer"],
                    "answer_type": r["answer_type"],
                    "prediction": _prediction(ckpt, i, r["answer"]),
                    "checkpoint": f"/runs/{ckpt}",
                    "generation": {"max_new_tokens": 8},
                    "modality": r["modality"],
                    "language": "en",
                }
            )
        rows.append(  # a DICOM question: its thumbnail is windowed as the readers do
            {**rows[0], "id": "ct-1", "image": str(CT), "modality": "CT", "answer": "no",
             "answer_type": "CLOSED", "question": "Is this <b>bold</b>?",
             "prediction": "yes" if ckpt == CKPTS[0] else "no"}
        )  # fmt: skip
        d = out / ckpt / "slake"
        d.mkdir(parents=True)
        (d / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (d / "metrics.json").write_text(json.dumps(score_predictions(rows)))
        rows_by_ckpt[ckpt] = rows
    (out / "checkpoints.json").write_text(json.dumps({c: f"/runs/{c}" for c in CKPTS}))
    written = write_eval_figures(out, image_roots={"slake": root})
    return out, rows_by_ckpt, written


def _png(path, size):
    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.shape[:2] == (size[1], size[0])
    assert 0.01 < (img < 250).any(axis=-1).mean() < 0.7
    return img


def test_bar_charts_hold_the_table_values(eval_dir):
    out, _, written = eval_dir
    pairs = eval_pairs(out)
    assert [(p["checkpoint"], p["dataset"]) for p in pairs] == [(c, "slake") for c in CKPTS]
    keys = charts.chart_metrics(pairs)
    assert "closed_accuracy_strict" in keys and "open_token_f1" in keys
    assert not any(k.startswith("n_") or k == "n" for k in keys)
    for k in keys:
        _png(out / "charts" / f"{k}.png", charts.CHART_PX)
    assert out / "charts" / "closed_accuracy_strict.png" in written
    fig = charts.bar_chart("closed_accuracy_strict", pairs)
    ax = fig.axes[0]
    assert [c.get_label() for c in ax.containers] == list(CKPTS)
    for container, p in zip(ax.containers, pairs):
        assert [b.get_height() for b in container] == [p["metrics"]["closed_accuracy_strict"]]
    labels = [t.get_text() for t in ax.texts]
    assert labels == [f"{p['metrics']['closed_accuracy_strict']:.4f}" for p in pairs]


def test_dicom_thumbnail_is_windowed_like_the_reader():
    url = thumbnail(CT)
    got = np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",")[1]))).convert("L"))
    want_img = load_image(CT)
    want_img.thumbnail((160, 160), Image.Resampling.BICUBIC)
    want = np.asarray(want_img.convert("L")).astype(float)
    assert got.shape == want.shape == (128, 128)  # CT_small is 128 px: never enlarged
    assert np.abs(got - want).mean() < 3  # JPEG only
    assert got.std() > 20  # an image, not a flat square


def test_page_data_counts_equal_the_metrics(eval_dir):
    _, rows_by_ckpt, _ = eval_dir
    a, b = (rows_by_ckpt[c] for c in CKPTS)
    key = row_key(a[1])
    verdicts = {key: {"key": key, "verdict": "RIGHT"}}
    data = page_data([(CKPTS[0], a), (CKPTS[1], b)], dataset="slake", verdicts=verdicts,
                     thumbnails=False)  # fmt: skip
    assert data["rules"] == ["strict", "llava_med", "judge"]
    assert [r["id"] for r in data["rows"]] == [str(r["id"]) for r in a]
    oks = [r["preds"][CKPTS[0]]["ok"]["strict"] for r in data["rows"]]
    m = score_predictions(a)
    n_right = round(m["closed_accuracy_strict"] * m["n_closed"]) + round(
        m["open_exact_match"] * m["n_open"]
    )
    assert oks.count(True) == n_right and oks.count(False) == m["n_closed"] + m["n_open"] - n_right
    judged = [r["preds"][CKPTS[0]]["ok"]["judge"] for r in data["rows"]]
    assert judged[1] is True and judged.count(None) == len(a) - 1


def test_report_page_in_headless_chromium(eval_dir, tmp_path):
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"chromium not found at {CHROMIUM} (make test installs it: make browser)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (dev extra) missing")
    out, rows_by_ckpt, written = eval_dir
    page_path = out / CKPTS[0] / "slake" / "report.html"
    assert page_path in written
    text = page_path.read_text()
    assert "http://" not in text and "https://" not in text  # offline: nothing fetched
    a, b = (rows_by_ckpt[c] for c in CKPTS)
    wrong = [r for r in a if score_row(r) and not _strict(r)]
    right = [r for r in a if score_row(r) and _strict(r)]
    a_only = [ra for ra, rb in zip(a, b) if _strict(ra) and not _strict(rb)]
    assert wrong and right and a_only

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(page_path.as_uri())
            visible = "tr.row:not([hidden])"
            assert page.locator(visible).count() == len(a)
            assert page.inner_text("#count") == f"{len(a)} of {len(a)} questions"
            # every thumbnail decoded (the DICOM too)
            sizes = page.eval_on_selector_all("#rows img", "els => els.map(e => e.naturalWidth)")
            assert len(sizes) == len(a) and min(sizes) > 0
            page.select_option("#status", "wrong")
            assert page.locator(visible).count() == len(wrong)
            ids = page.eval_on_selector_all(visible, "els => els.map(e => e.cells[1].innerText)")
            assert ids == [str(r["id"]) for r in wrong]
            page.screenshot(path=str(tmp_path / "report_wrong.png"), full_page=False)
            page.select_option("#status", "right")
            assert page.locator(visible).count() == len(right)
            # search: the DICOM question, whose text is shown as text, not markup
            page.select_option("#status", "")
            page.fill("#search", "<b>bold</b>")
            assert page.locator(visible).count() == 1
            assert "<b>bold</b>" in page.locator(visible).first.inner_text()
            page.fill("#search", "")
            page.select_option("#modality", "CT")
            assert page.locator(visible).count() == sum(r["modality"] == "CT" for r in a)
            page.select_option("#modality", "")
            page.select_option("#atype", "OPEN")
            assert page.locator(visible).count() == sum(r["answer_type"] == "OPEN" for r in a)
            page.select_option("#atype", "")
            # side by side with the second checkpoint
            page.select_option("#compare", CKPTS[1])
            page.select_option("#status", "a_only")
            assert page.locator(visible).count() == len(a_only)
            second = page.eval_on_selector_all(visible, "els => els.map(e => e.cells[6].innerText)")
            want = {str(r["id"]): r["prediction"] for r in b}
            shown = page.eval_on_selector_all(visible, "els => els.map(e => e.cells[1].innerText)")
            assert second == [want[i] for i in shown]
            page.select_option("#status", "")
            page.screenshot(path=str(tmp_path / "report_side.png"), full_page=False)
            assert not errors, errors
        finally:
            browser.close()
    _png(tmp_path / "report_wrong.png", (1400, 900))
    print(f"screenshots: {tmp_path / 'report_wrong.png'} {tmp_path / 'report_side.png'}")


def _strict(row) -> bool:
    s = score_row(row)
    key = "closed_accuracy_strict" if s["answer_type"] == "CLOSED" else "open_exact_match"
    return s[key] == 1.0


def test_roc_curves_match_sklearn(tmp_path):
    from sklearn.metrics import roc_auc_score

    from medtune.eval.classification_metrics import score_classification_rows

    rng = np.random.default_rng(0)
    rows = []
    for i in range(60):
        labels = {"effusion": int(i % 3 == 0), "nodule": int(i % 4 == 0), "rare": 0}
        scores = {c: float(rng.random() + 0.8 * v) for c, v in labels.items()}
        rows.append({"id": i, "labels": labels, "scores": scores})
    fig, curves = charts.roc_figure(rows)
    assert set(curves) == {"effusion", "nodule"}  # "rare" has one label value
    m = score_classification_rows(rows)
    for c, (_, _, auc) in curves.items():
        y = [r["labels"][c] for r in rows]
        s = [r["scores"][c] for r in rows]
        assert auc == roc_auc_score(y, s) == m["auroc"][c]
    lines = {ln.get_label(): ln for ln in fig.axes[0].get_lines()}
    fpr, tpr, _ = curves["nodule"]
    ln = lines[f"nodule (AUROC {curves['nodule'][2]:.3f})"]
    assert list(ln.get_xdata()) == list(fpr) and list(ln.get_ydata()) == list(tpr)
    # area under the drawn line = the AUROC reported
    assert np.trapezoid(ln.get_ydata(), ln.get_xdata()) == pytest.approx(curves["nodule"][2])
    path = charts.roc_curves(rows, tmp_path / "roc.png")
    _png(path, (int(charts.CHART_PX[1] * 1.25), charts.CHART_PX[1]))


def test_thumbnails_are_capped_and_the_rest_named(eval_dir, tiny_assets):
    _, rows_by_ckpt, _ = eval_dir
    rows = rows_by_ckpt[CKPTS[0]]
    root = Path(tiny_assets) / "tiny_slake" / "Slake1.0"
    data = page_data([(CKPTS[0], rows)], dataset="slake", image_root=root, max_thumbnails=2)
    images = list(data["images"].values())
    assert len(images) > 2 and data["thumbnails_left_out"] == len(images) - 2
    assert [("src" in v) for v in images] == [True, True] + [False] * (len(images) - 2)
    assert all(Path(v["path"]).is_file() for v in images)  # the rest are named by their path
