"""``vision_finetune/slake_medcap`` through the CLI on tiny models: the shipped config, its builder
swapped for the tiny medcap-shaped one (:func:`medtune.models.builders.tiny_medcap`: pooled tower
-> medcap's 50-token MLP projector -> tiny Llama-3), starts from a medcap-layout ``last.pt``
(``{'visual': open_clip names, 'projector': Sequential}``) through ``init_from`` kind ``medcap``
(:mod:`medtune.models.convert.medcap`) and trains the tower and the projector with the LLM
frozen."""

from __future__ import annotations

import json
import re

import pytest
from safetensors.torch import load_file

from medtune._cli.main import main
from medtune.testing.medcap import write_medcap_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def test_slake_medcap_from_a_medcap_checkpoint(tiny_assets, tmp_path, capsys):
    llm = tiny_assets / "llama3_tiny"
    width = json.loads((llm / "config.json").read_text())["hidden_size"]
    visual, projector = write_medcap_checkpoint(
        tiny_assets / "tiny_clip", tmp_path / "last.pt", llm_dim=width, num_tokens=50
    )
    out = tmp_path / "medcap"
    with pytest.raises(SystemExit) as e:
        main([
            "run", "vision_finetune", "--config", "slake_medcap", f"model_dir={llm}",
            f"data_dir={tiny_assets / 'tiny_slake' / 'Slake1.0'}", f"output_dir={out}",
            f"init_from.path={tmp_path / 'last.pt'}",
            "model._component_=medtune.models.builders.tiny_medcap", "~model.encoder_path",
            f"+model.assets_dir={tiny_assets}", "+model.hidden_dim=32",
            f"+tokenizer.special_tokens_path={llm / 'tokenizer.json'}",
            "checkpointer.checkpoint_files=[model.safetensors]", "llm_dtype=fp32",
            "autocast=false", "device=cpu", "epochs=1", "max_steps_per_epoch=1", "batch_size=2",
            "num_workers=0", "val_dataset=null", "enable_activation_checkpointing=false",
            "lr_scheduler.num_warmup_steps=0",
        ])  # fmt: skip
    assert e.value.code in (0, None)
    text = capsys.readouterr().out
    for part, state in (("encoder", "full"), ("connector", "full"), ("llm", "frozen")):
        assert re.search(rf"{part}\s+{state}", text), text[-2000:]
    saved = load_file(str(out / "epoch_0" / "model.safetensors"))
    # what trained: medcap's tower and projector, nothing of the LLM
    assert {k.split(".")[0] for k in saved} == {"encoders", "connectors"}
    assert saved["connectors.image.proj.2.weight"].shape == projector["2.weight"].shape
    assert saved["connectors.image.proj.2.weight"].shape[0] == 50 * width
    # started from the medcap file: one AdamW step at lr 1e-4 / 2e-5 moves each tensor by ~lr
    for name, src, lr in (
        ("connectors.image.proj.0.weight", projector["0.weight"], 1e-4),
        ("encoders.image.tower.conv1.weight", visual["conv1.weight"], 2e-5),
    ):
        delta = (saved[name] - src).abs().max().item()
        assert 0 < delta <= 1.5 * lr, (name, delta)
