"""``model: hf``: a tiny random LLaVA and a tiny random Qwen2-VL (built from config, no download)
answer the benchmark fixtures through ``medtune run eval``; 1 and 2 processes (torchrun, gloo)
write the same predictions and the same table."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from medtune._cli.main import main
from medtune.data.sample import Message, Sample
from medtune.eval.backends import BackendConfigError, build_backend, parse_spec
from medtune.generation import GenerationConfig

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

REPO = Path(__file__).resolve().parents[3]
ARGS = [
    "--config",
    "demo_backends",
    "checkpoints.tuned=null",
    "checkpoints.served=null",
    "datasets.pmc_vqa=null",
    "datasets.mmmu_med=null",
    "batch_size=2",
    "generation.max_new_tokens=4",
]


def _cli(*argv: str) -> int:
    try:
        status = main(list(argv))
    except SystemExit as e:
        status = e.code
    return int(status or 0)


def _predictions(out: Path) -> dict[tuple[str, str], list[tuple]]:
    got = {}
    for f in sorted(out.glob("*/*/predictions.jsonl")):
        rows = [json.loads(line) for line in f.read_text().splitlines()]
        got[(f.parent.parent.name, f.parent.name)] = [(r["id"], r["prediction"]) for r in rows]
    return got


@pytest.fixture(scope="module")
def one_process(demo_assets, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hf1")
    assert _cli("run", "eval", *ARGS, f"assets_dir={demo_assets}", f"output_dir={out}") == 0
    return out


def test_hf_models_answer_every_question(one_process):
    preds = _predictions(one_process)
    assert set(preds) == {
        (m, d) for m in ("llava", "qwen2_vl") for d in ("pathvqa", "omnimedvqa", "medxpertqa_mm")
    }
    assert len(preds[("llava", "pathvqa")]) == 6 and len(preds[("qwen2_vl", "medxpertqa_mm")]) == 3
    assert all(isinstance(p, str) for rows in preds.values() for _, p in rows)
    # the random models do not answer alike: the two backends really ran their own weights
    assert preds[("llava", "omnimedvqa")] != preds[("qwen2_vl", "omnimedvqa")]
    with open(one_process / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert {(r["checkpoint"], r["model"], r["task"]) for r in table} >= {
        ("llava", "hf", "mcq"),
        ("qwen2_vl", "hf", "vqa"),
    }
    rows = [
        json.loads(x)
        for x in (one_process / "llava" / "omnimedvqa" / "predictions.jsonl")
        .read_text()
        .splitlines()
    ]
    assert (
        rows[0]["task"] == "mcq"
        and rows[0]["choices"]
        and rows[0]["checkpoint"].endswith("tiny_hf_vlms/llava")
    )
    assert rows[0]["prompt"].startswith("\nQuestion: ") and "A. " in rows[0]["prompt"]


def test_two_processes_equal_one(one_process, demo_assets, tmp_path, medtune_cli):
    out = tmp_path / "hf2"
    # 2 ranks forked from the pre-imported medtune_cli server, as torchrun --standalone sets them up
    proc = medtune_cli.run("run", "eval", *ARGS, f"assets_dir={demo_assets}", f"output_dir={out}",
                           cwd=REPO, nproc=2, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 processes" in proc.stdout
    assert _predictions(out) == _predictions(one_process)
    assert (out / "results.csv").read_text() == (one_process / "results.csv").read_text()


def test_backend_batches_equal_single_and_bad_folder(hf_vlms, demo_assets, tmp_path):
    from medtune.data.benchmarks import medxpertqa

    samples = [Sample(s.id, s.images, [Message("user", s.meta["question"])], s.meta)
               for s in medxpertqa(demo_assets / "benchmarks" / "MedXpertQA")]  # fmt: skip
    backend = build_backend(
        parse_spec("q", {"model": "hf", "path": str(hf_vlms / "qwen2_vl")}),
        device="cpu",
        batch_size=3,
    )
    settings = GenerationConfig(max_new_tokens=4)
    batched = backend.answer(samples, settings)
    backend.batch_size = 1
    assert (
        backend.answer(samples, settings) == batched
    )  # left padding: a batch answers as one by one
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(BackendConfigError, match="not a transformers image-text-to-text folder"):
        build_backend(parse_spec("x", {"model": "hf", "path": str(tmp_path)}), device="cpu")
    with pytest.raises(
        BackendConfigError, match=r"checkpoints.x: unknown key\(s\) pth for model: hf"
    ):
        parse_spec("x", {"model": "hf", "pth": "/m"})
