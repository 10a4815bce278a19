"""``recipes/serve.py``: config errors through the CLI, and ``vqa_judge``'s ``openai_compatible``
backend against ``medtune serve`` of a plain (text-only) tiny Llama-3."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from medtune._cli.main import main
from medtune.data.sample import Message, Sample
from medtune.eval.judge import DEFAULT_PROMPT_TEMPLATE, render_prompt
from medtune.generation import GenerationConfig
from medtune.inference import answer

from .conftest import running

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "serve.py"
CONFIGS = REPO / "recipes" / "configs" / "serve"

pytestmark = pytest.mark.slow


def _run(capsys, *argv: str) -> tuple[int, str]:
    try:
        status = main(list(argv))
    except SystemExit as e:
        status = e.code
    return int(status or 0), capsys.readouterr().err


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ([], "checkpoint: set checkpoint="),
        (["checkpoint=/nonexistent/epoch_0"], "/nonexistent/epoch_0"),
        (["checkpoint=x", "port=99999"], "port: must be 0..65535"),
        (["checkpoint=x", "max_batch_size=abc"], "max_batch_size: expected an integer"),
        (["checkpoint=x", "api_key_env=MEDTUNE_TEST_UNSET_KEY"], "MEDTUNE_TEST_UNSET_KEY"),
        (["checkpoint=x", "+max_batchsize=2"], "max_batchsize"),
    ],
)
def test_config_errors_are_one_line(capsys, monkeypatch, overrides, fragment):
    monkeypatch.delenv("MEDTUNE_TEST_UNSET_KEY", raising=False)
    status, err = _run(capsys, "run", "serve", "--config", "default", *overrides)
    assert status == 1, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("serve: error: ")]
    assert len(lines) == 1 and fragment in lines[0], err


def _plain_llama_cfg(assets: Path, tmp: Path):
    cfg = OmegaConf.load(CONFIGS / "default.yaml")
    cfg.llm = {
        "tokenizer": {
            "_component_": "medtune.models.llama3.llama3_tokenizer",
            "path": f"{assets}/llama3_tiny/original/tokenizer.model",
            "special_tokens_path": f"{assets}/llama3_tiny/tokenizer.json",
        },
        "model": {
            "_component_": "medtune.models.llama3.llama3_from_hf_config",
            "config_path": f"{assets}/llama3_tiny/config.json",
        },
        "checkpointer": {
            "_component_": "torchtune.training.FullModelHFCheckpointer",
            "checkpoint_dir": f"{assets}/llama3_tiny",
            "checkpoint_files": ["model.safetensors"],
            "model_type": "LLAMA3",
            "output_dir": str(tmp / "unused"),
        },
    }
    cfg.model_name = "tiny-judge"
    cfg.device = "cpu"
    cfg.max_wait_ms = 50
    return cfg


def test_vqa_judge_against_served_plain_llama3(tiny_assets, tmp_path, capsys):
    serve = runpy.run_path(str(RECIPE))  # the recipe's own loading code, not a copy
    app, host, port = serve["build_app"](_plain_llama_cfg(tiny_assets, tmp_path))
    assert (host, port) == ("127.0.0.1", 8000)  # the default binds loopback only
    engine = app.state.engine
    assert not engine.takes_images

    rows = [
        {
            "id": i,
            "dataset": "slake",
            "split": "test",
            "image": f"img{i}.png",
            "question": f"Is there a lesion in organ {i}?",
            "answer": "yes" if i % 2 else "no",
            "answer_type": "CLOSED",
            "prediction": "yes",
            "checkpoint": "ck1",
            "generation": {"max_new_tokens": 8},
        }
        for i in range(6)
    ]
    preds = tmp_path / "preds.jsonl"
    preds.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "judge"
    with running(app) as url:
        status, err = _run(
            capsys,
            "run",
            "vqa_judge",
            "--config",
            "openai_compatible",
            f"predictions=[{preds}]",
            f"output_dir={out}",
            f"judge.base_url={url}/v1",
            "judge.model=tiny-judge",
            "judge.max_tokens=8",
            "judge.concurrency=3",
            "retry_unparsed=0",
        )
    assert status == 0, err
    verdicts = [json.loads(line) for line in (out / "verdicts.jsonl").read_text().splitlines()]
    assert sorted(v["id"] for v in verdicts) == list(range(6))
    # every reply is what the model answers to that prompt through the inference path
    prompts = {r["id"]: render_prompt(DEFAULT_PROMPT_TEMPLATE, r) for r in rows}
    samples = [Sample(str(i), [], [Message("user", prompts[i])]) for i in range(6)]
    want = answer(
        engine.model,
        engine.transform,
        samples,
        GenerationConfig(max_new_tokens=8),
        tokenizer=engine.tokenizer,
    )
    for v in verdicts:
        assert v["raw"] == engine.decode(want[v["id"]].token_ids), v
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_right"] + summary["n_wrong"] + summary["n_unparsed"] == 6
