"""Every LLM family through the CLI on tiny models: ``vision_finetune`` (its ``demo_<family>``
config, one step), then ``eval`` over the three checkpoints and ``generate`` with one of them;
full fine-tuning (Qwen2.5), LoRA (Mistral), QLoRA (NF4 Mistral) and DoRA (Qwen2.5), eval with
beam search; in-process, beam search batched == per sample on each family's checkpoint and the
local ``vqa_judge`` backend with each family. Only the config differs between families; the
recipes are the same files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

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


def test_full_finetune_qwen_then_eval(tiny_assets, tmp_path):
    """The full recipe takes a Qwen2.5 LLM through the config alone; its tuned LLM is written in
    HF layout with Qwen's q/k/v biases and eval reloads it."""
    q = cached_tiny_llms() / "qwen2_5_tiny"
    out = tmp_path / "ff"
    _run(
        "full_finetune", "--config", "demo", f"assets_dir={tiny_assets}", f"output_dir={out}",
        "epochs=1", "max_steps_per_epoch=1", "batch_size=2", "val_dataset=null",
        "tokenizer._component_=medtune.models.llm.qwen2_5.qwen2_5_tokenizer",
        f"tokenizer.path={q / 'vocab.json'}", f"+tokenizer.merges_file={q / 'merges.txt'}",
        f"tokenizer.special_tokens_path={q / 'tokenizer.json'}",
        "model._component_=medtune.models.llm.builders.medvlm_open_clip_llm", "~model.assets_dir",
        f"+model.llm_config={q / 'config.json'}", f"+model.encoder_path={tiny_assets / 'tiny_clip'}",
        f"checkpointer.checkpoint_dir={q}", "checkpointer.model_type=QWEN2",
        "lr_scheduler.num_warmup_steps=0",
    )  # fmt: skip
    from safetensors.torch import load_file

    tuned = load_file(str(out / "epoch_0" / "llm" / "model.safetensors"))
    hf = load_file(str(q / "model.safetensors"))
    assert tuned.keys() == hf.keys() and "model.layers.0.self_attn.q_proj.bias" in tuned
    assert not torch.equal(tuned["model.layers.0.mlp.up_proj.weight"],
                           hf["model.layers.0.mlp.up_proj.weight"])  # fmt: skip
    _run(
        "eval", "--config", "demo", f"assets_dir={tiny_assets}", f"checkpoints=[{out / 'epoch_0'}]",
        f"output_dir={tmp_path / 'eval'}", "limit=2", "generation.max_new_tokens=3",
    )  # fmt: skip
    rows = (tmp_path / "eval" / "ff_epoch_0" / "slake" / "predictions.jsonl").read_text()
    assert len(rows.splitlines()) == 2


def test_lora_finetune_mistral_then_eval(tiny_assets, tmp_path):
    """The LoRA recipe takes a Mistral LLM through the config alone (torchtune's lora_mistral);
    eval reloads the adapters over the base weights."""
    m = cached_tiny_llms() / "mistral_tiny"
    out = tmp_path / "lora"
    _run(
        "lora_finetune", "--config", "demo", f"assets_dir={tiny_assets}", f"output_dir={out}",
        "epochs=1", "max_steps_per_epoch=1", "batch_size=2", "val_dataset=null",
        "lr_scheduler.num_warmup_steps=0",
        "tokenizer._component_=medtune.models.llm.mistral.mistral_tokenizer",
        f"tokenizer.path={m / 'tokenizer.model'}", "~tokenizer.special_tokens_path",
        "model._component_=medtune.models.llm.lora.medvlm_open_clip_lora_llm", "~model.assets_dir",
        f"+model.llm_config={m / 'config.json'}", f"+model.encoder_path={tiny_assets / 'tiny_clip'}",
        f"checkpointer.checkpoint_dir={m}", "checkpointer.model_type=MISTRAL",
    )  # fmt: skip
    from safetensors.torch import load_file

    saved = load_file(str(out / "epoch_0" / "model.safetensors"))
    lora = [k for k in saved if "lora_" in k]
    assert lora and any(not torch.equal(saved[k], torch.zeros_like(saved[k])) for k in lora)
    _run(
        "eval", "--config", "demo", f"assets_dir={tiny_assets}", f"checkpoints=[{out / 'epoch_0'}]",
        f"output_dir={tmp_path / 'eval'}", "limit=2", "generation.max_new_tokens=3",
    )  # fmt: skip
    rows = (tmp_path / "eval" / "lora_epoch_0" / "slake" / "predictions.jsonl").read_text()
    assert len(rows.splitlines()) == 2


def test_qlora_and_dora_other_families_then_beam_eval(tiny_assets, tmp_path):
    """QLoRA (NF4 base, a 256-wide tiny Mistral: NF4's scaler blocks) and DoRA (Qwen2.5) through
    ``lora_finetune``, then one ``eval`` of both checkpoints with beam search (2 beams)."""
    from safetensors.torch import load_file

    llms = cached_tiny_llms()
    m, q = llms / "mistral_tiny256", llms / "qwen2_5_tiny"
    common = [
        "--config", "demo", f"assets_dir={tiny_assets}", "epochs=1", "max_steps_per_epoch=1",
        "batch_size=2", "val_dataset=null", "lr_scheduler.num_warmup_steps=0",
        "~model.assets_dir", f"+model.encoder_path={tiny_assets / 'tiny_clip'}",
        "model._component_=medtune.models.llm.lora.medvlm_open_clip_lora_llm",
    ]  # fmt: skip
    qlora, dora = tmp_path / "qlora", tmp_path / "dora"
    _run(
        "lora_finetune", *common, f"output_dir={qlora}", "model.quantize_base=true",
        "tokenizer._component_=medtune.models.llm.mistral.mistral_tokenizer",
        f"tokenizer.path={m / 'tokenizer.model'}", "~tokenizer.special_tokens_path",
        f"+model.llm_config={m / 'config.json'}", f"checkpointer.checkpoint_dir={m}",
        "checkpointer.model_type=MISTRAL",
    )  # fmt: skip
    _run(
        "lora_finetune", *common, f"output_dir={dora}", "model.use_dora=true",
        "tokenizer._component_=medtune.models.llm.qwen2_5.qwen2_5_tokenizer",
        f"tokenizer.path={q / 'vocab.json'}", f"+tokenizer.merges_file={q / 'merges.txt'}",
        f"tokenizer.special_tokens_path={q / 'tokenizer.json'}",
        f"+model.llm_config={q / 'config.json'}", f"checkpointer.checkpoint_dir={q}",
        "checkpointer.model_type=QWEN2",
    )  # fmt: skip
    saved = load_file(str(qlora / "epoch_0" / "model.safetensors"))
    lora_b = [k for k in saved if "lora_b" in k]
    assert lora_b and any(saved[k].abs().sum() > 0 for k in lora_b)  # the adapters trained
    assert not any(k.endswith("attn.q_proj.weight") for k in saved)  # the NF4 base is not saved
    saved = load_file(str(dora / "epoch_0" / "model.safetensors"))
    assert any(k.endswith("magnitude") for k in saved)  # DoRA's magnitudes train and are saved
    adapter = json.loads((dora / "epoch_0" / "adapter" / "adapter_config.json").read_text())
    assert adapter["use_dora"] is True
    assert (dora / "epoch_0" / "adapter" / "vocab.json").is_file()  # Qwen's tokenizer exported
    _run(
        "eval", "--config", "demo", f"assets_dir={tiny_assets}",
        f"checkpoints=[{qlora / 'epoch_0'},{dora / 'epoch_0'}]", f"output_dir={tmp_path / 'eval'}",
        "limit=2", "generation.max_new_tokens=3", "generation.num_beams=2",
    )  # fmt: skip
    for name in ("qlora", "dora"):
        rows = [
            json.loads(r)
            for r in (tmp_path / "eval" / f"{name}_epoch_0" / "slake" / "predictions.jsonl")
            .read_text()
            .splitlines()
        ]
        assert len(rows) == 2 and all(r["generation"]["num_beams"] == 2 for r in rows)


def test_beam_search_batched_equals_per_sample_each_family(trained, tiny_assets):
    """Beam search (3 beams) over each family's vision checkpoint: a batch of questions with
    images gives the answers each question gets alone (Vicuna's, Mistral's and Qwen's stop ids)."""
    from medtune.data import slake
    from medtune.data.model_transform import medvlm_transform
    from medtune.generation import GenerationConfig
    from medtune.inference import answer
    from medtune.training.loading import load_from_checkpoint

    samples = slake(tiny_assets / "tiny_slake" / "Slake1.0", split="test")[:3]
    beams = GenerationConfig(max_new_tokens=4, num_beams=3)
    for fam in FAMILIES:
        model, tok, _ = load_from_checkpoint(trained / fam / "epoch_0")
        model.eval()
        transform = medvlm_transform(model, tok)
        kw = dict(tokenizer=tok, data_parallel=False, progress=False)
        batched = answer(model, transform, samples, beams, batch_size=3, **kw)
        alone = answer(model, transform, samples, beams, batch_size=1, **kw)
        assert [a.token_ids for a in batched] == [a.token_ids for a in alone], fam
        assert all(len(a.token_ids) <= 4 for a in batched)


@pytest.mark.parametrize("fam", list(FAMILIES))
def test_local_judge_each_family(fam, tmp_path):
    """The local ``vqa_judge`` backend with a Vicuna, Mistral or Qwen2.5 judge (its tokenizer,
    ``medtune.models.llm.llm_from_hf_config``, the checkpointer's ``model_type``): batched
    replies equal single ones and decode to text without the chat format's special tokens."""
    from medtune.eval.judge import build_local_generate_fn

    d = cached_tiny_llms() / FAMILIES[fam]
    tokenizer, model_type = {
        "vicuna": ({"_component_": "medtune.models.llm.llama2.vicuna_tokenizer",
                    "path": str(d / "tokenizer.model")}, "LLAMA2"),
        "mistral": ({"_component_": "medtune.models.llm.mistral.mistral_tokenizer",
                     "path": str(d / "tokenizer.model")}, "MISTRAL"),
        "qwen2_5": ({"_component_": "medtune.models.llm.qwen2_5.qwen2_5_tokenizer",
                     "path": str(d / "vocab.json"), "merges_file": str(d / "merges.txt"),
                     "special_tokens_path": str(d / "tokenizer.json")}, "QWEN2"),
    }[fam]  # fmt: skip
    cfg = {
        "tokenizer": tokenizer,
        "model": {
            "_component_": "medtune.models.llm.llm_from_hf_config",
            "config_path": str(d / "config.json"),
        },
        "checkpointer": {
            "_component_": "torchtune.training.FullModelHFCheckpointer",
            "checkpoint_dir": str(d),
            "checkpoint_files": ["model.safetensors"],
            "model_type": model_type,
            "output_dir": str(tmp_path),
        },
        "device": "cpu",
        "max_new_tokens": 4,
        "batch_size": 2,
    }
    fn = build_local_generate_fn(cfg)
    prompts = [
        "Question: is this a ct?\nOur answer: yes\nCorrect answer: no",
        "short",
        "which organ",
    ]
    batched = fn(prompts)
    assert len(batched) == 3 and all(isinstance(t, str) for t in batched)
    assert batched == [fn([p])[0] for p in prompts]
    for t in batched:
        assert not any(x in t for x in ("<|im_end|>", "<|im_start|>", "</s>", "[INST]")), t
