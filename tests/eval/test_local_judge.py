"""The ``local`` judge backend end to end with a tiny Llama-3 (mechanics, batching, cache).

The tiny model is random, so its replies are gibberish (mostly UNPARSED): these tests check the
wiring (tokenizer -> chat-format ids -> medtune.generation -> text), batching and the verdict
cache, not the judgement.
"""

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

torch = pytest.importorskip("torch")

from medtune.eval.judge import (  # noqa: E402
    VERDICTS,
    VerdictStore,
    build_local_generate_fn,
    build_local_judge,
    run_judge,
)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from medtune.testing.assets import write_llama, write_tokenizer

    d = tmp_path_factory.mktemp("assets") / "llama3_tiny"
    d.mkdir()
    vocab = write_tokenizer(d)
    write_llama(d, vocab, pretrain_steps=0)
    return d


def judge_cfg(d, out, **extra):
    return OmegaConf.create(
        {
            "tokenizer": {
                "_component_": "medtune.models.llama3.llama3_tokenizer",
                "path": str(d / "original" / "tokenizer.model"),
                "special_tokens_path": str(d / "tokenizer.json"),
            },
            "model": {
                "_component_": "medtune.models.llama3.llama3_from_hf_config",
                "config_path": str(d / "config.json"),
            },
            "checkpointer": {
                "_component_": "torchtune.training.FullModelHFCheckpointer",
                "checkpoint_dir": str(d),
                "checkpoint_files": ["model.safetensors"],
                "model_type": "LLAMA3",
                "output_dir": str(out),
            },
            "device": "cpu",
            "max_new_tokens": 3,
            **extra,
        }
    )


def test_local_generate_batched_equals_single(tiny_llama, tmp_path):
    fn = build_local_generate_fn(judge_cfg(tiny_llama, tmp_path, batch_size=2))
    prompts = [
        "Question: is this a ct?\nOur answer: yes\nCorrect answer: no",
        "short",
        "which organ is shown on the left side of the image",
    ]
    batched = fn(prompts)  # batches of 2 + 1, left-padded
    assert len(batched) == 3 and all(isinstance(t, str) for t in batched)
    assert batched == [fn([p])[0] for p in prompts]  # greedy: same text alone or in a batch


def test_local_backend_end_to_end_with_cache(tiny_llama, tmp_path, pred_rows):
    pred_rows = pred_rows[:6]
    calls = []
    backend = build_local_judge(name="local:tiny", **judge_cfg(tiny_llama, tmp_path, batch_size=4))
    generate_texts = backend.generate_texts

    def counted(prompts):
        calls.append(len(prompts))
        return generate_texts(prompts)

    backend.generate_texts = counted
    path = tmp_path / "verdicts.jsonl"
    with VerdictStore(path) as store:
        verdicts = run_judge(pred_rows, backend, store, batch_size=4)
    assert len(verdicts) == 6
    # every prompt sent once, plus once more for each UNPARSED reply (retried once)
    assert sum(calls) == sum(v["attempts"] for v in verdicts)
    assert max(calls) <= 4
    for v in verdicts:
        assert v["verdict"] in VERDICTS and v["judge"] == "local:tiny"
        assert isinstance(v["raw"], str)
        assert v["attempts"] == (2 if v["verdict"] == "UNPARSED" else 1)
    n_calls = len(calls)
    with VerdictStore(path) as store:
        again = run_judge(pred_rows, backend, store, batch_size=4)
    assert len(calls) == n_calls  # all cached
    assert again == verdicts
    assert len(path.read_text().splitlines()) == 6
    assert all(json.loads(line)["key"] for line in path.read_text().splitlines())


def test_local_rejects_unknown_quantize(tiny_llama, tmp_path):
    with pytest.raises(ValueError, match="quantize"):
        build_local_generate_fn(judge_cfg(tiny_llama, tmp_path, quantize="int3"))


def test_recipe_with_local_backend(tiny_llama, tmp_path, pred_rows, capsys):
    """``medtune run vqa_judge`` with the shipped llama3_70b_nf4 config pointed at the tiny model."""
    from medtune._cli.main import main

    from .conftest import write_jsonl

    repo = Path(__file__).resolve().parents[2]
    cfg = OmegaConf.load(repo / "recipes" / "configs" / "vqa_judge" / "llama3_70b_nf4.yaml")
    cfg.model_dir = str(tiny_llama)
    cfg.judge.checkpointer.checkpoint_files = ["model.safetensors"]
    cfg.judge.quantize = None  # the tiny model's dims are too small for NF4 blocks
    cfg.judge.device, cfg.judge.dtype, cfg.judge.max_new_tokens = "cpu", "fp32", 3
    config_path = tmp_path / "tiny_local.yaml"
    OmegaConf.save(cfg, config_path)
    preds = write_jsonl(tmp_path / "p.jsonl", pred_rows[:4])
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "vqa_judge", "--config", str(config_path), f"predictions=[{preds}]",
              f"output_dir={out}"])  # fmt: skip
    assert exit_info.value.code == 0, capsys.readouterr()
    rows = [json.loads(line) for line in (out / "verdicts.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and {r["judge"] for r in rows} == {"local:llama3_70b_instruct_nf4"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_right"] + summary["n_wrong"] + summary["n_unparsed"] == 4
    assert (out / "summary.md").exists()
