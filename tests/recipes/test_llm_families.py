"""Every LLM family through the CLI on tiny models: ``vision_finetune`` (its ``demo_<family>``
config, one step), then ``eval`` over the three checkpoints and ``generate`` with one of them.
Only the config differs between families; the recipes are the same files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medtune._cli.main import main
from medtune.testing.llm_families import cached_tiny_llms

FAMILIES = {"vicuna": "vicuna_tiny", "mistral": "mistral_tiny", "qwen2_5": "qwen2_5_tiny"}

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def _run(*argv: str) -> None:
    with pytest.raises(SystemExit) as e:
        main(["run", *argv])
    assert e.value.code in (0, None)


@pytest.fixture(scope="module")
def trained(tiny_assets, tmp_path_factory):
    llms = cached_tiny_llms()
    out = tmp_path_factory.mktemp("families")
    for fam, folder in FAMILIES.items():
        _run(
            "vision_finetune",
            "--config",
            f"demo_{fam}",
            f"assets_dir={tiny_assets}",
            f"model_dir={llms / folder}",
            f"output_dir={out / fam}",
            "epochs=1",
            "max_steps_per_epoch=1",
            "batch_size=4",
            "val_dataset=null",
            "lr_scheduler.num_warmup_steps=1",
        )
    return out


def test_vision_finetune_each_family(trained):
    for fam in FAMILIES:
        ckpt = trained / fam / "epoch_0"
        assert (ckpt / "model.safetensors").is_file()
        assert "decoder." not in (ckpt / "model.safetensors").read_bytes()[:4000].decode(
            "latin-1"
        )  # the frozen LLM is not saved: the checkpoint reloads over the released weights


def test_eval_and_generate_each_family(trained, tiny_assets, capsys):
    ckpts = ",".join(str(trained / f / "epoch_0") for f in FAMILIES)
    _run(
        "eval",
        "--config",
        "demo",
        f"assets_dir={tiny_assets}",
        f"checkpoints=[{ckpts}]",
        f"output_dir={trained / 'eval'}",
        "limit=4",
        "generation.max_new_tokens=4",
    )
    for fam in FAMILIES:
        rows = [
            json.loads(line)
            for line in (trained / "eval" / f"{fam}_epoch_0" / "slake" / "predictions.jsonl")
            .read_text()
            .splitlines()
        ]
        assert len(rows) == 4
        assert all(isinstance(r["prediction"], str) for r in rows)
        assert {Path(r["checkpoint"]).parent.name for r in rows} == {fam}
    capsys.readouterr()
    _run(
        "generate",
        "--config",
        "demo",
        f"assets_dir={tiny_assets}",
        f"checkpoint={trained / 'qwen2_5' / 'epoch_0'}",
        f"output_dir={trained / 'gen'}",
        "max_new_tokens=4",
    )
    printed = capsys.readouterr().out
    assert f"loading {trained / 'qwen2_5' / 'epoch_0'}" in printed
    answer = printed.rstrip("\n").splitlines()[-1]
    assert "<|im_end|>" not in answer and "<|im_start|>" not in answer  # stops, decodes text
