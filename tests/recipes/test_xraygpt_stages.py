"""XrayGPT's workflow through the CLI on tiny models: stage 1 (``vision_finetune/mimic_cxr_xraygpt``)
starts from a MiniGPT-4 checkpoint with MiniGPT-4's parameter names (``init_from`` kind
``minigpt4``), stage 2 (``vision_finetune/openi_xraygpt``) starts from the stage-1 run and
validates on OpenI's held-out uids (:mod:`medtune.data.uid_split`, leakage-checked), and
``eval/openi_report`` scores it on those held-out uids. The Q-Former stays frozen through both
stages, only the projection trains; the LLM is the tiny Vicuna in XrayGPT's
``###Patient: ... ###Doctor:`` format."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from medtune._cli.main import main
from medtune.testing.llm_families import cached_tiny_llms
from medtune.testing.reports import make_xraygpt_fixture, save_xray
from tests.models.convert.lavis_names import lavis_qformer

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
SIZES = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
}


def _run(*argv: str) -> None:
    with pytest.raises(SystemExit) as e:
        main(["run", *argv])
    assert e.value.code in (0, None)


def test_two_stages_then_eval(tiny_assets, tmp_path, capsys):
    llms = cached_tiny_llms()
    vicuna = llms / "vicuna_tiny"
    clip = tiny_assets / "tiny_clip"
    width = json.loads((clip / "open_clip_config.json").read_text())["model_cfg"]["vision_cfg"][
        "width"
    ]
    minigpt4 = lavis_qformer(layers=2, hidden=32, inter=64, vision_width=width, vocab=50,
                             max_pos=20, queries=4, text=False)  # fmt: skip
    minigpt4 |= {"llama_proj.weight": torch.randn(64, 32), "llama_proj.bias": torch.zeros(64)}
    torch.save({"model": minigpt4}, tmp_path / "pretrained_minigpt4.pth")
    data = make_xraygpt_fixture(tmp_path)
    sizes = "{" + ", ".join(f"{k}: {v}" for k, v in SIZES.items()) + "}"
    tiny = [
        f"model_dir={vicuna}", "model._component_=medtune.models.llm.builders.tiny_xraygpt_vicuna",
        "~model.encoder_checkpoint", f"+model.llm_config={vicuna / 'config.json'}",
        f"+model.encoder_path={clip}", "model.num_query_tokens=4", f"+model.sizes={sizes}",
        "checkpointer.checkpoint_files=[model.safetensors]", "llm_dtype=fp32", "autocast=false",
        "device=cpu", "epochs=1", "max_steps_per_epoch=1", "batch_size=2", "max_seq_len=256",
        "lr_scheduler.num_warmup_steps=0", "num_workers=0", f"data_dir={data}",
    ]  # fmt: skip
    s1, s2 = tmp_path / "stage1", tmp_path / "stage2"
    _run("vision_finetune", "--config", "mimic_cxr_xraygpt", *tiny, f"output_dir={s1}",
         f"init_from.path={tmp_path / 'pretrained_minigpt4.pth'}", "~init_from.qformer_path")  # fmt: skip
    one = load_file(str(s1 / "epoch_0" / "model.safetensors"))
    q = "connectors.image.qformer.encoder.layer.0.crossattention.attention.key.weight"
    assert torch.equal(
        one[q], minigpt4["Qformer.bert.encoder.layer.0.crossattention.self.key.weight"]
    )
    assert torch.equal(one["connectors.image.query_tokens"], minigpt4["query_tokens"])
    assert not torch.equal(one["connectors.image.proj.weight"], minigpt4["llama_proj.weight"])
    openi_x = tmp_path / "openi_xraygpt"  # XrayGPT's OpenI release: CXR<uid>_IM-... images
    anns = []
    for u in range(1, 6):
        for view in (1001, 2001):  # two images per report: the split must keep them together
            save_xray(openi_x / "image" / f"CXR{u}_IM-{u:04d}-{view}.png", seed=u)
            anns.append({"image_id": f"CXR{u}_IM-{u:04d}-{view}", "caption": f"Report {u}: clear."})
    (openi_x / "filter_cap.json").write_text(json.dumps({"annotations": anns}))
    capsys.readouterr()
    _run("vision_finetune", "--config", "openi_xraygpt", *tiny[:-1], f"data_dir={openi_x}",
         f"output_dir={s2}", "dataset.fraction=0.4", "val_dataset.fraction=0.4",
         f"init_from={s1 / 'epoch_0'}")  # fmt: skip
    printed = capsys.readouterr().out
    two = load_file(str(s2 / "epoch_0" / "model.safetensors"))
    assert torch.equal(two[q], one[q])  # the frozen Q-Former came through stage 1
    assert torch.equal(two["connectors.image.query_tokens"], one["connectors.image.query_tokens"])
    assert not torch.equal(two["connectors.image.proj.weight"], one["connectors.image.proj.weight"])
    split = json.loads((openi_x / "medtune_uid_split.json").read_text())
    assert len(split["validation"]) == 2 and not set(split["validation"]) & set(split["train"])
    assert "validation loss" in printed  # stage 2 validated on the held-out uids
    logged = (s2 / "logs").rglob("*")
    assert any("val_loss" in p.read_text() for p in logged if p.is_file())
    _run("eval", "--config", "openi_report", f"checkpoints=[{s2 / 'epoch_0'}]",
         "datasets.openi._component_=medtune.data.uid_split.xraygpt_openi",
         f"datasets.openi.root={openi_x}", "~datasets.openi.section",
         "+datasets.openi.split=validation", "+datasets.openi.fraction=0.4",
         f"output_dir={tmp_path / 'eval'}", "device=cpu",
         "caption_generation.max_new_tokens=4", "caption_generation.min_new_tokens=0",
         "caption_generation.num_beams=1", "caption_meteor=false")  # fmt: skip
    rows = [
        json.loads(r)
        for r in (tmp_path / "eval" / "stage2_epoch_0" / "openi" / "predictions.jsonl")
        .read_text()
        .splitlines()
    ]
    held_out = {f"CXR{u}_IM-{int(u):04d}-{v}" for u in split["validation"] for v in (1001, 2001)}
    assert {r["id"] for r in rows} == held_out  # scored on the held-out reports only
    assert all(isinstance(r["prediction"], str) for r in rows)
