"""``medtune run eval`` on chest X-ray report data (OpenI and MIMIC-CXR fixtures) with a tiny checkpoint.

Checks caption rows, the caption metrics in the results table, per-report scores, beam search
through the ``caption_generation`` block (applied, and recorded in the rows), CheXbert F1 with a
tiny random labeler, that ``medtune score`` re-scores the predictions to the same numbers, the
generation config errors and the shipped report configs.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from medtune._cli.main import main
from medtune.data.report_readers import mimic_cxr, openi
from medtune.eval.caption_metrics import CAPTION_METRIC_KEYS
from medtune.eval.predictions import read_predictions
from medtune.eval.report import CHEXBERT_TABLE_KEYS
from medtune.testing.reports import (
    MIMIC_FIXTURE_COUNTS,
    OPENI_FIXTURE_COUNTS,
    make_mimic_cxr_fixture,
    make_openi_fixture,
)

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "recipes" / "configs" / "eval"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("java") is None, reason="caption metrics need java"),
]


def _cli(*argv: str) -> int:
    try:
        status = main(list(argv))
    except SystemExit as e:  # torchtune's config.parse exits with the recipe's status
        status = e.code
    return int(status or 0)


@pytest.fixture(scope="module")
def checkpoint(tiny_assets, tmp_path_factory) -> Path:
    """One tiny vision_finetune checkpoint (1 step)."""
    out = tmp_path_factory.mktemp("run")
    status = _cli(
        "run", "vision_finetune", "--config", "demo", f"assets_dir={tiny_assets}",
        f"output_dir={out / 'run1'}", "epochs=1", "max_steps_per_epoch=1", "batch_size=8",
        "log_every_n_steps=100",
    )  # fmt: skip
    assert status == 0
    return out / "run1" / "epoch_0"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("reports")
    make_openi_fixture(root)
    make_mimic_cxr_fixture(root)
    return root


@pytest.fixture(scope="module")
def tiny_chexbert(tmp_path_factory) -> Path:
    """A CheXbert folder as users have it (chexbert.pth with DataParallel keys, config.json,
    vocab.txt), with a tiny random BERT and random heads."""
    from transformers import BertConfig

    from medtune.eval.chexbert import CheXbertLabeler

    folder = tmp_path_factory.mktemp("chexbert")
    words = "the heart size is normal lungs are clear no pleural effusion edema mild left . ,"
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *dict.fromkeys(words.split())]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=24, max_position_embeddings=512,
    )  # fmt: skip
    (folder / "config.json").write_text(config.to_json_string())
    torch.manual_seed(0)
    state = {f"module.{k}": v for k, v in CheXbertLabeler(config).state_dict().items()}
    torch.save({"model_state_dict": state}, folder / "chexbert.pth")
    return folder


def _eval(*overrides: str, config: str = "openi_report") -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = _cli(
            "run", "eval", "--config", config, "device=cpu", "batch_size=2",
            "caption_generation.max_new_tokens=8", "caption_generation.min_new_tokens=2",
            "caption_meteor=false", *overrides,
        )  # fmt: skip
    return status, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def beam_run(checkpoint, data, tiny_chexbert, tmp_path_factory) -> Path:
    """openi_report as shipped (3 beams) on the OpenI fixture, with the tiny CheXbert."""
    out = tmp_path_factory.mktemp("eval_openi")
    status, stdout, err = _eval(
        f"checkpoints=[{checkpoint}]", f"data_dir={data / 'openi'}", f"output_dir={out}",
        f"chexbert_dir={tiny_chexbert}",
    )  # fmt: skip
    assert status == 0, stdout[-3000:] + err[-3000:]
    assert "dataset openi: 3 samples (caption); not samples: empty findings 1" in stdout
    return out


def _score(capsys, *argv: str) -> dict:
    capsys.readouterr()
    assert _cli("score", *argv) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def test_openi_report_rows_metrics_table_and_rescore(
    beam_run, checkpoint, data, tiny_chexbert, capsys
):
    folder = beam_run / "run1_epoch_0" / "openi"
    pred = folder / "predictions.jsonl"
    rows = read_predictions(pred)
    samples = openi(data / "openi")
    assert [r["id"] for r in rows] == [str(u) for u in OPENI_FIXTURE_COUNTS["findings"]["kept"]]
    for r, s in zip(rows, samples):
        assert r["task"] == "caption" and r["answer_type"] == "CAPTION" and r["dataset"] == "openi"
        assert r["answer"] == s.meta["findings"] and isinstance(r["prediction"], str)
        assert r["checkpoint"] == str(checkpoint)
        gen = r["generation"]
        assert (gen["num_beams"], gen["max_new_tokens"], gen["min_new_tokens"]) == (3, 8, 2)
        assert gen["prompt_mode"] == "caption" and gen["temperature"] == 0.0

    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["n"] == 3 and all(k in metrics for k in CAPTION_METRIC_KEYS)
    assert metrics["METEOR"] is None  # caption_meteor=false
    # `medtune score` on the predictions file: the same JSON, per-report scores, CheXbert
    per_row = folder.parent / "rescored_per_row.jsonl"
    rescored = _score(
        capsys,
        str(pred),
        "--no-meteor",
        "--per-row",
        str(per_row),
        "--chexbert",
        str(tiny_chexbert),
    )
    assert rescored == metrics
    lines = (folder / "per_row.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == [
        json.loads(x) for x in per_row.read_text().splitlines()
    ]
    assert [json.loads(x)["id"] for x in lines] == [r["id"] for r in rows]
    assert set(json.loads(lines[0])) == {"id", "dataset", "split", *CAPTION_METRIC_KEYS}

    # CheXbert: what score_reports_chexbert gives on the predictions and references
    from medtune.eval.chexbert import score_reports_chexbert

    direct = score_reports_chexbert(
        [r["prediction"] for r in rows], [r["answer"] for r in rows], tiny_chexbert
    )
    assert metrics["chexbert"] == json.loads(json.dumps(direct))
    assert metrics["chexbert"]["n"] == 3

    # the results table: one row, caption metrics and the CheXbert F1 columns, as in metrics.json
    with open(beam_run / "results.csv") as fh:
        (row,) = list(csv.DictReader(fh))
    assert list(row) == [
        *("checkpoint", "model", "dataset", "task", "n"),
        *CAPTION_METRIC_KEYS,
        *CHEXBERT_TABLE_KEYS,
    ]
    assert (row["checkpoint"], row["dataset"], row["n"]) == ("run1_epoch_0", "openi", "3")
    for k in ("BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr"):
        assert float(row[k]) == pytest.approx(metrics[k], rel=1e-12, abs=0)
    assert row["METEOR"] == ""
    for k in CHEXBERT_TABLE_KEYS:
        assert float(row[k]) == pytest.approx(metrics["chexbert"][k], rel=1e-12, abs=0)
    header = (beam_run / "results.md").read_text().splitlines()[0]
    assert (
        "CIDEr" in header and "f1chexbert_5_macro_f1" in header and "closed_accuracy" not in header
    )


def test_num_beams_is_applied_and_recorded(beam_run, checkpoint, data):
    from medtune.data.model_transform import medvlm_transform
    from medtune.eval.questions import caption_sample
    from medtune.generation import GenerationConfig
    from medtune.inference import answer
    from medtune.training.loading import load_from_checkpoint

    rows = read_predictions(beam_run / "run1_epoch_0" / "openi" / "predictions.jsonl")
    beam = GenerationConfig(max_new_tokens=8, min_new_tokens=2, num_beams=3)
    recorded = {**beam.to_dict(), "system_prompt": None, "prompt_mode": "caption"}
    assert all(r["generation"] == recorded for r in rows)
    # other settings in the same output_dir are refused (resume keys on the recorded settings)
    status, _, err = _eval(
        f"checkpoints=[{checkpoint}]", f"data_dir={data / 'openi'}", f"output_dir={beam_run}",
        "caption_generation.num_beams=1",
    )  # fmt: skip
    assert status == 1 and "overwrite=true" in err and "'num_beams': 3" in err

    # the predictions are what the inference path decodes with 3 beams, and not greedy's
    model, tok, _ = load_from_checkpoint(str(checkpoint), torch.device("cpu"), None, {})
    transform = medvlm_transform(model, tok)
    asked = [caption_sample(s) for s in openi(data / "openi")]

    def texts(settings):
        out = answer(model, transform, asked, settings, tokenizer=tok, batch_size=2)
        return [a.text for a in out]

    assert [r["prediction"] for r in rows] == texts(beam)
    # (on this fixture greedy decodes something else, so the check above tells them apart)
    assert [r["prediction"] for r in rows] != texts(replace(beam, num_beams=1))


def test_mimic_cxr_report_config_runs(checkpoint, data, tmp_path):
    status, stdout, err = _eval(
        f"checkpoints=[{checkpoint}]", f"data_dir={data / 'mimic-cxr-jpg'}",
        f"output_dir={tmp_path}", "datasets.mimic_cxr.split=train", "caption_generation.num_beams=2",
        config="mimic_cxr_report",
    )  # fmt: skip
    assert status == 0, stdout[-3000:] + err[-3000:]
    folder = tmp_path / "run1_epoch_0" / "mimic_cxr"
    rows = read_predictions(folder / "predictions.jsonl")
    assert [r["id"] for r in rows] == MIMIC_FIXTURE_COUNTS[("train", "findings")]
    refs = {s.id: s.meta["findings"] for s in mimic_cxr(data / "mimic-cxr-jpg", split="train")}
    assert all(r["answer"] == refs[r["id"]] and r["generation"]["num_beams"] == 2 for r in rows)
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["n"] == 2 and "chexbert" not in metrics  # chexbert_dir: null by default
    assert "f1chexbert" not in (tmp_path / "results.md").read_text()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("+caption_generation.num_beam=3", "caption_generation.num_beam: unknown key"),
        ("generation.num_beams=0", "generation.num_beams: expected an integer >= 1"),
        ("caption_generation.min_new_tokens=99", "caption_generation.min_new_tokens: expected"),
        ("caption_generation=3", "caption_generation: expected a mapping"),
        ("chexbert_tokenizer_dir=/x", "chexbert_tokenizer_dir is set but chexbert_dir is not"),
    ],
)
def test_generation_config_errors_name_the_key(override, message, tmp_path):
    status, _, err = _eval("checkpoints=[/nonexistent]", f"output_dir={tmp_path}", override)
    assert status == 1 and message in err and "Traceback" not in err


def test_missing_chexbert_fails_before_generating(checkpoint, data, tmp_path):
    status, stdout, err = _eval(
        f"checkpoints=[{checkpoint}]", f"data_dir={data / 'openi'}", f"output_dir={tmp_path}",
        f"chexbert_dir={tmp_path / 'nope'}",
    )  # fmt: skip
    assert status == 1 and "CheXbert checkpoint not found" in err
    assert "to generate" not in stdout and not list(tmp_path.rglob("predictions.jsonl"))


def test_generation_blocks():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "medtune_eval_recipe", REPO / "recipes" / "eval.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = OmegaConf.create(
        {"generation": {"max_new_tokens": 16, "repetition_penalty": 1.2, "seed": 3},
         "caption_generation": {"num_beams": 4, "length_penalty": 0.5}}
    )  # fmt: skip
    gens = mod.generation_configs(cfg)
    assert (gens["vqa"].max_new_tokens, gens["vqa"].num_beams, gens["vqa"].seed) == (16, 1, 3)
    cap = gens["caption"]  # merged over generation, its own max_new_tokens default
    assert (cap.max_new_tokens, cap.num_beams, cap.length_penalty) == (128, 4, 0.5)
    assert (cap.repetition_penalty, cap.seed) == (1.2, 3)
    # no blocks at all: the old defaults
    gens = mod.generation_configs(OmegaConf.create({}))
    assert (gens["vqa"].max_new_tokens, gens["caption"].max_new_tokens) == (32, 128)
    assert gens["vqa"].temperature == 0.0 and gens["caption"].num_beams == 1
