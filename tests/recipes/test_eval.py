"""``medtune run eval`` end to end on the SLAKE and VQA-RAD fixture folders with two tiny checkpoints.

Checks the predictions JSONL schema, metrics.json (the same JSON as ``medtune score``), the
combined table, resume after an interrupted run, describe-then-answer's per-image description
cache, caption scoring, and the shipped configs.
"""

from __future__ import annotations

import ast
import csv
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from medtune._cli.main import main
from medtune.data import VQA_SHORT_ANSWER, slake, vqa_rad
from medtune.eval.medevalkit_vqa import MEDEVALKIT_VQA_KEYS, score_medevalkit_vqa
from medtune.eval.predictions import REQUIRED_KEYS, read_predictions
from medtune.eval.vqa_metrics import METRIC_KEYS, score_predictions
from medtune.testing.datasets import make_medical_image, make_slake_fixture, make_vqa_rad_fixture

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "eval.py"
CONFIGS = REPO / "recipes" / "configs" / "eval"

pytestmark = pytest.mark.slow


def _cli(*argv: str) -> int:
    """``medtune <argv>`` in this process (saves the torch/torchtune import of a subprocess)."""
    try:
        status = main(list(argv))
    except SystemExit as e:  # torchtune's config.parse exits with the recipe's status
        status = e.code
    return int(status or 0)


def _assets_root(tiny_assets) -> Path:
    return (
        tiny_assets if isinstance(tiny_assets, Path) else Path(tiny_assets.root)
    )  # Path or TinyAssets


@pytest.fixture(scope="module")
def checkpoints(tiny_assets, tmp_path_factory) -> list[Path]:
    """Two tiny vision_finetune checkpoints (different seeds, 2 steps each)."""
    assets = _assets_root(tiny_assets)
    out = tmp_path_factory.mktemp("runs")
    paths = []
    for name, seed in (("run1", 0), ("run2", 1)):
        status = _cli(
            "run",
            "vision_finetune",
            "--config",
            "demo",
            f"assets_dir={assets}",
            f"output_dir={out / name}",
            "epochs=1",
            "max_steps_per_epoch=2",
            f"seed={seed}",
            "batch_size=8",
            "log_every_n_steps=100",
        )
        assert status == 0
        paths.append(out / name / "epoch_0")
        assert (paths[-1] / "model.safetensors").is_file()
    return paths


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    make_slake_fixture(root)
    make_vqa_rad_fixture(root)
    return root


def _eval(*overrides: str, config: str = "slake_vqa_rad") -> int:
    return _cli(
        "run",
        "eval",
        "--config",
        config,
        "device=cpu",
        "batch_size=4",
        "generation.max_new_tokens=4",
        *overrides,
    )


@pytest.fixture(scope="module")
def first_run(checkpoints, data_dir, tmp_path_factory):
    """One eval run over 2 checkpoints x (SLAKE en test, VQA-RAD test), and what it printed."""
    out = tmp_path_factory.mktemp("eval")
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        status = _eval(
            f"checkpoints=[{checkpoints[0]},{checkpoints[1]}]",
            f"data_dir={data_dir}",
            f"output_dir={out}",
        )
    assert status == 0, buf.getvalue()[-3000:]
    return out, buf.getvalue()


def test_eval_end_to_end(first_run, checkpoints, data_dir):
    out, stdout = first_run
    expected = {
        "slake": slake(data_dir, split="test", lang="en"),
        "vqa_rad": vqa_rad(data_dir, split="test"),
    }
    names = {"run1_epoch_0": checkpoints[0], "run2_epoch_0": checkpoints[1]}
    for ckpt_name, ckpt_path in names.items():
        for ds_name, samples in expected.items():
            folder = out / ckpt_name / ds_name
            rows = read_predictions(
                folder / "predictions.jsonl"
            )  # validates the schema of every row
            assert sorted(r["id"] for r in rows) == sorted(s.id for s in samples)
            for r in rows:
                assert set(REQUIRED_KEYS) <= set(r)
                assert r["checkpoint"] == str(ckpt_path)
                assert (
                    r["generation"]["max_new_tokens"] == 4 and r["generation"]["temperature"] == 0.0
                )
                assert r["generation"]["prompt_mode"] == "direct"
                assert r["answer_type"] in ("CLOSED", "OPEN") and r["language"] == "en"
                assert r["dataset"] == ds_name and r["split"] == "test"
                assert isinstance(r["prediction"], str)
            if ds_name == "slake":
                assert all("modality" in r and "content_type" in r for r in rows)
            metrics = json.loads((folder / "metrics.json").read_text())
            for key in (*METRIC_KEYS, "n_closed", "n_open", "n_skipped_empty_answer", "rules"):
                assert key in metrics
            rescored = {
                "predictions": str(folder / "predictions.jsonl"),
                **score_predictions(rows),
                **score_medevalkit_vqa(rows),
            }
            assert metrics == json.loads(json.dumps(rescored))  # exactly what `medtune score` gives
            if ds_name == "slake":
                assert metrics["n_skipped_empty_answer"] == 1  # the fixture's empty answer
    md = (out / "results.md").read_text().strip().splitlines()
    assert md[0].startswith("| checkpoint | model | dataset | task | n |")
    assert all(k in md[0] for k in (*METRIC_KEYS, *MEDEVALKIT_VQA_KEYS))
    from medtune.eval.vqa_metrics import LLAVA_MED_CLOSED_NOTE

    assert md[2 + 4 + 1] == LLAVA_MED_CLOSED_NOTE  # the rule said under the table
    assert md[2 + 4 + 3] == "Per group:"  # then the per-group table (answer type, modality, ...)
    with open(out / "results.csv") as fh:
        table = list(csv.DictReader(fh))
    assert [(r["checkpoint"], r["dataset"]) for r in table] == [
        ("run1_epoch_0", "slake"),
        ("run1_epoch_0", "vqa_rad"),
        ("run2_epoch_0", "slake"),
        ("run2_epoch_0", "vqa_rad"),
    ]
    slake_metrics = json.loads((out / "run1_epoch_0" / "slake" / "metrics.json").read_text())
    assert float(table[0]["closed_accuracy_strict"]) == pytest.approx(
        slake_metrics["closed_accuracy_strict"]
    )
    assert int(table[0]["n"]) == slake_metrics["n_closed"] + slake_metrics["n_open"]
    assert "\n".join(md) in stdout  # the table is printed at the end


def test_eval_resumes_interrupted_run(first_run, checkpoints, data_dir, tmp_path, capsys):
    src, _ = first_run
    out = tmp_path / "eval"
    shutil.copytree(src, out)
    pred = out / "run2_epoch_0" / "vqa_rad" / "predictions.jsonl"
    before = {r["id"]: r["prediction"] for r in read_predictions(pred)}
    lines = pred.read_text().splitlines(keepends=True)
    pred.write_text(
        "".join(lines[:-3]) + lines[-3][: len(lines[-3]) // 2]
    )  # 2 rows gone, 1 cut mid-line
    capsys.readouterr()
    assert (
        _eval(
            f"checkpoints=[{checkpoints[0]},{checkpoints[1]}]",
            f"data_dir={data_dir}",
            f"output_dir={out}",
        )
        == 0
    )
    log = capsys.readouterr().out
    assert "run2_epoch_0 x vqa_rad: 3 to generate, 5 already done" in log
    assert log.count("eval: loading") == 1  # complete pairs load no model
    rows = read_predictions(pred)
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)) == len(before)
    assert {r["id"]: r["prediction"] for r in rows} == before
    assert pred.read_text().endswith("\n")


def test_describe_then_answer_caches_descriptions(checkpoints, data_dir, tmp_path, capsys):
    out = tmp_path / "dta"
    args = [
        f"checkpoints=[{checkpoints[0]}]",
        f"data_dir={data_dir}",
        f"output_dir={out}",
        "datasets.vqa_rad=null",
        "prompt_mode=describe_then_answer",
        "describe_max_new_tokens=6",
    ]
    assert _eval(*args) == 0
    folder = out / "run1_epoch_0" / "slake"
    desc = [json.loads(line) for line in (folder / "descriptions.jsonl").read_text().splitlines()]
    samples = slake(data_dir, split="test", lang="en")
    images = {s.meta["image"] for s in samples}
    assert sorted(d["image"] for d in desc) == sorted(images)  # once per distinct image
    assert len(images) < len(samples)
    by_image = {d["image"]: d["description"] for d in desc}
    rows = read_predictions(folder / "predictions.jsonl")
    assert len(rows) == len(samples)
    for r in rows:
        assert r["generation"]["prompt_mode"] == "describe_then_answer"
        assert r["generation"]["describe_prompt"] == "Describe the medical image."
        assert r["description"] == by_image[r["image"]]
    # an interrupted run: the predictions and the description of one image are lost
    lost_image = desc[-1]["image"]
    keep = [r for r in rows if r["image"] != lost_image]
    (folder / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in keep))
    (folder / "descriptions.jsonl").write_text("".join(json.dumps(d) + "\n" for d in desc[:-1]))
    capsys.readouterr()
    assert _eval(*args) == 0
    assert "describing 1 image(s) (2 cached)" in capsys.readouterr().out
    desc2 = [json.loads(line) for line in (folder / "descriptions.jsonl").read_text().splitlines()]
    assert sorted(d["image"] for d in desc2) == sorted(images)
    assert {r["id"]: r["prediction"] for r in read_predictions(folder / "predictions.jsonl")} == {
        r["id"]: r["prediction"] for r in rows
    }


def test_short_answer_instruction(checkpoints, data_dir, tmp_path):
    out = tmp_path / "short"
    args = [f"checkpoints=[{checkpoints[0]}]", f"data_dir={data_dir}", f"output_dir={out}"]
    assert _eval(*args, "datasets.vqa_rad=null", "limit=3", "short_answer=true") == 0
    rows = read_predictions(out / "run1_epoch_0" / "slake" / "predictions.jsonl")
    assert len(rows) == 3
    for r in rows:
        assert r["prompt"] == r["question"] + "\nAnswer with a single word or phrase."
        assert r["generation"]["prompt_template"] == VQA_SHORT_ANSWER


def test_caption_dataset_scored_with_caption_metrics(checkpoints, tmp_path):
    if shutil.which("java") is None:
        pytest.skip("caption metrics need java")
    (tmp_path / "img").mkdir()
    rows = []
    for i, (mod, side) in enumerate([("CT", "left"), ("MRI", "right"), ("X-Ray", None)]):
        make_medical_image(i, modality=mod, lesion=side).save(tmp_path / "img" / f"{i}.png")
        rows.append(
            {
                "id": f"c{i}",
                "image": f"img/{i}.png",
                "caption": f"{mod} scan with a lesion on the {side}",
            }
        )
    (tmp_path / "captions.json").write_text(json.dumps(rows))
    cfg = OmegaConf.load(CONFIGS / "demo.yaml")
    cfg.assets_dir = str(tmp_path)  # the demo's assets are not read here (datasets replaced)
    cfg.datasets = {
        "figs": {
            "_component_": "medtune.data.caption_json",
            "path": str(tmp_path / "captions.json"),
        }
    }
    OmegaConf.save(cfg, tmp_path / "captions.yaml")
    out = tmp_path / "out"
    status = _cli(
        "run",
        "eval",
        "--config",
        str(tmp_path / "captions.yaml"),
        f"checkpoints=[{checkpoints[0]}]",
        f"output_dir={out}",
        "caption_generation.max_new_tokens=6",
        "caption_meteor=false",
    )
    assert status == 0
    folder = out / "run1_epoch_0" / "figs"
    preds = read_predictions(folder / "predictions.jsonl")
    assert len(preds) == 3 and all(
        r["task"] == "caption" and r["answer_type"] == "CAPTION" for r in preds
    )
    assert all(r["generation"]["max_new_tokens"] == 6 for r in preds)
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["n"] == 3 and all(k in metrics for k in ("BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr"))
    header = (out / "results.md").read_text().splitlines()[0]
    assert "BLEU-1" in header and "CIDEr" in header and "closed_accuracy_strict" not in header


def _load_recipe_module():
    spec = importlib.util.spec_from_file_location("medtune_eval_recipe", RECIPE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_checkpoint_names_are_readable_and_unique():
    names = _load_recipe_module().checkpoint_names
    assert names(["runs/run1/epoch_2", "runs/run2/epoch_4"]) == ["run1_epoch_2", "run2_epoch_4"]
    assert names(["a/x/epoch_1", "b/x/epoch_1"]) == ["a_x_epoch_1", "b_x_epoch_1"]
    assert names(["/x/epoch_1", "/x/epoch_1"]) == ["x_epoch_1", "x_epoch_1-2"]


def test_missing_checkpoint_is_a_clear_error(tmp_path, data_dir, capsys):
    (tmp_path / "run" / "epoch_0").mkdir(parents=True)
    assert (
        _eval(
            f"checkpoints=[{tmp_path / 'run'}]",
            f"data_dir={data_dir}",
            f"output_dir={tmp_path / 'o'}",
        )
        == 1
    )
    err = capsys.readouterr().err
    assert "no config.yaml" in err and "epoch_0" in err


def _known_keys() -> set[str]:
    tree = ast.parse(RECIPE.read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "KNOWN_KEYS":
            return set(ast.literal_eval(node.value))
    raise AssertionError("KNOWN_KEYS not found")


@pytest.mark.parametrize(
    "name", ["slake", "vqa_rad", "slake_vqa_rad", "demo", "openi_report", "mimic_cxr_report"]
)
def test_eval_configs_are_valid(name):
    from medtune._cli.validate import collect_problems

    text = (CONFIGS / f"{name}.yaml").read_text()
    assert f"medtune run eval --config {name}" in text  # the header gives the exact command
    cfg = OmegaConf.load(CONFIGS / f"{name}.yaml")
    assert next(iter(cfg.keys())) == "output_dir"
    assert set(cfg.keys()) <= _known_keys(), set(cfg.keys()) - _known_keys()
    assert collect_problems(OmegaConf.to_container(cfg, resolve=True)) == []


def test_eval_two_ranks_equals_one(checkpoints, data_dir, tmp_path, medtune_cli):
    """``medtune run --nproc_per_node 2 eval`` (2 CPU ranks, gloo): the same files as 1 process.

    The one test that launches a real recipe through torchrun itself (the launcher is forked from
    the pre-imported ``medtune_cli`` server; torchrun starts both workers as fresh interpreters,
    through ``medtune._cli.launch``): every other multi-rank test forks its ranks.
    """

    args = [
        f"checkpoints=[{checkpoints[0]}]",
        f"data_dir={data_dir}",
        "device=cpu",
        "batch_size=2",  # several batches per dataset, so both ranks answer some
        "generation.max_new_tokens=4",
    ]
    assert (
        _cli("run", "eval", "--config", "slake_vqa_rad", *args, f"output_dir={tmp_path / 'one'}")
        == 0
    )
    proc = medtune_cli.run("run", "--nproc_per_node", "2", "eval", "--config", "slake_vqa_rad",
                           *args, f"output_dir={tmp_path / 'two'}", timeout=400)  # fmt: skip
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}"
    assert proc.stdout.count("eval: loading") == 1  # one log line: only rank 0 prints
    # every rank starts through medtune._cli.launch: no torchao import noise from any of them
    assert "Skipping import of cpp extensions" not in proc.stdout + proc.stderr
    for ds in ("slake", "vqa_rad"):
        one = tmp_path / "one" / "run1_epoch_0" / ds
        two = tmp_path / "two" / "run1_epoch_0" / ds
        rows1, rows2 = (
            read_predictions(one / "predictions.jsonl"),
            read_predictions(two / "predictions.jsonl"),
        )
        assert len(rows1) > 2 * 2  # more than one batch per rank
        assert rows2 == rows1  # same ids, same predictions, same order, every field
        m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
        m1.pop("predictions"), m2.pop("predictions")
        assert m1 == m2
    assert (tmp_path / "one" / "results.csv").read_text() == (
        tmp_path / "two" / "results.csv"
    ).read_text()
    leftovers = sorted(p.name for p in (tmp_path / "two").rglob("*") if p.name.endswith(".tmp"))
    assert leftovers == []
