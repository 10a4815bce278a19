"""``zero_shot_classify`` on the tiny towers and a tiny ChestX-ray14-layout set: prompts (CLI),
concept book, linear probe and retrieval; the rows score with ``medtune score``. The CLI runs in
this process; one prompts run is shared by the CLI and the classifier-rule tests."""

from __future__ import annotations

import contextlib
import io
import json
import runpy
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from medtune._cli.main import main as medtune_main

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "zero_shot_classify.py"
CONFIGS = REPO / "recipes" / "configs" / "zero_shot_classify"

pytestmark = pytest.mark.slow


def _run(towers: Path, out: Path, config: str = "demo", **over) -> dict:
    cfg = OmegaConf.load(CONFIGS / f"{config}.yaml")
    cfg.merge_with({"assets_dir": str(towers), "output_dir": str(out), **over})
    mod = runpy.run_path(str(RECIPE))
    recipe = mod["ZeroShotClassifyRecipe"](cfg)
    recipe.setup()
    return recipe.train()


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _medtune(*args: str) -> tuple[int, str, str]:
    """``medtune <args>`` in this process: (status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = medtune_main(list(args))
        except SystemExit as e:  # ``medtune run`` executes the recipe here; its sys.exit propagates
            status = e.code
    return int(status or 0), out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def prompts_run(tiny_towers, tmp_path_factory) -> Path:
    """``medtune run zero_shot_classify --config demo`` (prompts mode), shared by two tests."""
    out = tmp_path_factory.mktemp("zs") / "p"
    status, stdout, stderr = _medtune(
        "run",
        "zero_shot_classify",
        "--config",
        "demo",
        f"assets_dir={tiny_towers}",
        f"output_dir={out}",
    )
    assert status == 0, stdout[-2000:] + stderr[-3000:]
    return out


def test_prompts_through_cli_and_score(prompts_run):
    out = prompts_run
    rows = _rows(out / "predictions.jsonl")
    assert len(rows) == 24
    assert set(rows[0]) == {"id", "dataset", "split", "image", "labels", "scores", "rule"}
    assert rows[0]["dataset"] == "chestxray14" and rows[0]["split"] == "test"
    assert set(rows[0]["labels"]) == set(rows[0]["scores"]) == {"Nodule", "Mass"}
    assert {r["rule"] for r in rows} == {"prompts_vs_negative_softmax"}
    status, stdout, stderr = _medtune("score", str(out / "predictions.jsonl"))
    assert status == 0, stderr
    metrics = json.loads(stdout)
    saved = json.loads((out / "metrics.json").read_text())
    assert (
        metrics["auroc_macro"] == pytest.approx(saved["auroc_macro"])
        and saved["rule"] == rows[0]["rule"]
    )


def test_prompt_rule_is_open_clip_classifier(prompts_run, tiny_towers):
    """Scores = softmax over (class, negative) of scale * cos with the averaged, re-normalised prompts."""
    from medtune.data.classification import chestxray14
    from medtune.eval import zero_shot as zs
    from medtune.models.dual_encoder import open_clip_dual_encoder, tokenizer_for

    rows = _rows(prompts_run / "predictions.jsonl")
    m = open_clip_dual_encoder(
        str(tiny_towers / "tiny_biomedclip"), str(tiny_towers / "tiny_bert")
    ).eval()
    tok = tokenizer_for(m)
    items = chestxray14(tiny_towers / "tiny_cxr14", "test")
    feats = zs.embed_images(m, [it.image for it in items])
    templates = ["x ray scan showing {}.", "a {} in the lung."]
    with torch.no_grad():
        cls = []
        for name in ("lesion", "upper lesion"):
            e = m.encode_text(tok([t.format(name) for t in templates]))
            cls.append(torch.nn.functional.normalize(e.mean(0), dim=0))
        neg = m.encode_text(tok(["normal, no lesion."]))[0]
        scale = m.logit_scale()
        for j, c in enumerate(("Nodule", "Mass")):
            pos, ng = scale * feats @ cls[j], scale * feats @ neg
            expect = torch.stack([pos, ng], 1).softmax(1)[:, 0]
            got = torch.tensor([r["scores"][c] for r in rows])
            torch.testing.assert_close(got, expect)


def test_concepts_linear_probe_and_retrieval(tiny_towers, tmp_path):
    mc = _run(tiny_towers, tmp_path / "c", mode="concepts")
    assert mc["rule"] == "concepts_vs_normal_softmax_mean"
    assert {r["rule"] for r in _rows(tmp_path / "c" / "predictions.jsonl")} == {mc["rule"]}
    ml = _run(
        tiny_towers,
        tmp_path / "l",
        mode="linear_probe",
        val_dataset=OmegaConf.load(CONFIGS / "demo.yaml").train_dataset,
    )
    assert (tmp_path / "l" / "linear_probe" / "model.safetensors").is_file()
    assert ml["rule"] == "linear_probe_sigmoid" and "f1_at_val_threshold" in ml
    assert ml["auroc_macro"] > 0.7  # the lesion is drawn: frozen random features separate it
    mr = _run(tiny_towers, tmp_path / "r", config="demo_retrieval")
    assert (tmp_path / "r" / "retrieval.safetensors").is_file() and set(mr) >= {"txt_r1", "r_mean"}


def test_concept_book_without_class_is_user_error(tiny_towers, tmp_path):
    from medtune.utils.errors import UserError

    book = tmp_path / "book.json"
    book.write_text(json.dumps({"Nodule": ["a spot"]}))
    with pytest.raises(UserError, match="no entry for class"):
        _run(
            tiny_towers,
            tmp_path / "c",
            mode="concepts",
            concepts={"book": str(book), "normal": "normal"},
        )
