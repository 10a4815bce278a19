"""``medtune export hf`` through the CLI on a trained tiny checkpoint, then transformers alone.

A tiny ``vision_finetune`` run (the demo config, whose encoder reads block ``-1`` so that the export
is exact) is exported; a separate Python process that never imports medtune loads the folder
with ``AutoModelForImageTextToText`` + ``AutoProcessor`` and answers with greedy ``generate``; its
answers must equal ``medtune run generate``'s on the same images and questions. The exported folder
is then imported back (``vision_finetune`` with the ``llava_medvlm`` builder and
``LlavaLLMCheckpointer``) and trained for a step.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from medtune._cli.main import main

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

QUESTIONS = ["Which side is the lesion on?", "What modality is shown?", "Is there a lesion?"]

HF_ONLY = r"""
import json, sys
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
folder, rows = sys.argv[1], json.loads(sys.argv[2])
model = AutoModelForImageTextToText.from_pretrained(folder).eval()
proc = AutoProcessor.from_pretrained(folder)
out = []
for image, question in rows:
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = proc.apply_chat_template(msgs, add_generation_prompt=True)
    batch = proc(images=[Image.open(image)], text=[text], return_tensors="pt")
    ids = model.generate(**batch, max_new_tokens=6, do_sample=False)
    new = ids[0, batch["input_ids"].shape[1]:]
    out.append(proc.decode(new, skip_special_tokens=True).strip())
assert not any(m == "medtune" or m.startswith("medtune.") for m in sys.modules), "imported medtune"
print(json.dumps(out))
"""


def _cli(*argv: str) -> tuple[int, str]:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        try:
            status = main(list(argv))
        except SystemExit as e:
            status = e.code
    return int(status or 0), buf.getvalue()


@pytest.fixture(scope="module")
def exported(tiny_assets, tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    status, out = _cli(
        "run", "vision_finetune", "--config", "demo", f"assets_dir={tiny_assets}",
        f"output_dir={run}", "epochs=1", "max_steps_per_epoch=3", "batch_size=8",
        "log_every_n_steps=100",
    )  # fmt: skip
    assert status == 0, out[-2000:]
    folder = tmp_path_factory.mktemp("hf") / "llava"
    status, out = _cli("export", "hf", str(run / "epoch_0"), str(folder))
    assert status == 0, out[-2000:]
    return run / "epoch_0", folder


def test_transformers_alone_generates_what_medtune_generates(exported, tiny_assets, tmp_path):
    ckpt, folder = exported
    for name in ("config.json", "model.safetensors", "processor_config.json", "README.md"):
        assert (folder / name).is_file() or name == "processor_config.json", name
    cfg = json.loads((folder / "config.json").read_text())
    assert (
        cfg["model_type"] == "llava" and cfg["vision_config"]["model_type"] == "clip_vision_model"
    )
    assert cfg["vision_feature_layer"] == -1 and cfg["vision_feature_select_strategy"] == "default"
    imgs = sorted((tiny_assets / "tiny_slake" / "Slake1.0" / "imgs").glob("*/source.png"))[:3]
    rows = [[str(i), q] for i, q in zip(imgs, QUESTIONS, strict=True)]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", HF_ONLY, str(folder), json.dumps(rows)],
        capture_output=True, text=True, env=dict(env, OMP_NUM_THREADS="1"), cwd=tmp_path,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = json.loads(proc.stdout.strip().splitlines()[-1])
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"image": i, "question": q}) + "\n" for i, q in rows))
    out = tmp_path / "gen.jsonl"
    status, log = _cli(
        "run", "generate", "--config", "default", f"checkpoint={ckpt}", "device=cpu",
        "max_new_tokens=6", f"prompts={prompts}", f"output={out}", "batch_size=1",
    )  # fmt: skip
    assert status == 0, log[-2000:]
    ours = [json.loads(line)["prediction"].strip() for line in out.read_text().splitlines()]
    assert ours == theirs
    assert any(ours), "the tiny model answered nothing: the comparison would be vacuous"


def test_export_refuses_what_llava_cannot_hold(tiny_assets, tmp_path):
    """A tower read after its final norm (feature_layer null): refused with the reason."""
    run = tmp_path / "run"
    status, out = _cli(
        "run", "vision_finetune", "--config", "demo", f"assets_dir={tiny_assets}",
        f"output_dir={run}", "epochs=1", "max_steps_per_epoch=1", "batch_size=4",
        "log_every_n_steps=100", "model.feature_layer=null",
    )  # fmt: skip
    assert status == 0, out[-2000:]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status, _ = _cli("export", "hf", str(run / "epoch_0"), str(tmp_path / "x"))
    assert status != 0
    line = err.getvalue().strip().splitlines()[-1]
    assert line.startswith("medtune: error:") and "feature_layer" in line


def test_imported_llava_trains_with_vision_finetune(exported, tiny_assets, tmp_path):
    """The exported folder as a starting point: vision_finetune on the llava builder + checkpointer."""
    from omegaconf import OmegaConf

    _, folder = exported
    cfg = OmegaConf.load(Path(__file__).parents[2] / "recipes/configs/vision_finetune/demo.yaml")
    cfg.model = {"_component_": "medtune.models.llava.llava_medvlm", "path": str(folder)}
    cfg.checkpointer = {
        "_component_": "medtune.models.llava.LlavaLLMCheckpointer",
        "checkpoint_dir": str(folder),
    }
    OmegaConf.save(cfg, tmp_path / "from_llava.yaml")
    status, out = _cli(
        "run", "vision_finetune", "--config", str(tmp_path / "from_llava.yaml"),
        f"output_dir={tmp_path / 'again'}", f"assets_dir={tiny_assets}",
        "epochs=1", "max_steps_per_epoch=1", "batch_size=4", "log_every_n_steps=1",
    )  # fmt: skip
    assert status == 0, out[-3000:]
    assert (tmp_path / "again" / "epoch_0" / "model.safetensors").is_file()
    # the tuned checkpoint answers through generate (which rebuilds it from its config.yaml)
    image = sorted((tiny_assets / "tiny_slake" / "Slake1.0" / "imgs").glob("*/source.png"))[0]
    status, out = _cli(
        "run", "generate", "--config", "default", f"checkpoint={tmp_path / 'again' / 'epoch_0'}",
        "device=cpu", "max_new_tokens=4", f"image={image}", "question=Which side is the lesion on?",
    )  # fmt: skip
    assert status == 0, out[-2000:]


def test_imported_llava_trains_with_lora_finetune(exported, tiny_assets, tmp_path):
    """LoRA on the imported LLM (llava_medvlm_lora), one step, through the CLI."""
    from omegaconf import OmegaConf

    _, folder = exported
    cfg = OmegaConf.load(Path(__file__).parents[2] / "recipes/configs/lora_finetune/demo.yaml")
    lora = {
        k: v for k, v in cfg.model.items() if k.startswith(("lora_", "apply_", "use_", "quant"))
    }
    cfg.model = {
        "_component_": "medtune.models.llava.llava_medvlm_lora",
        "path": str(folder),
        **lora,
    }
    cfg.checkpointer = {
        "_component_": "medtune.models.llava.LlavaLLMCheckpointer",
        "checkpoint_dir": str(folder),
    }
    OmegaConf.save(cfg, tmp_path / "lora_from_llava.yaml")
    status, out = _cli(
        "run", "lora_finetune", "--config", str(tmp_path / "lora_from_llava.yaml"),
        f"output_dir={tmp_path / 'lora'}", f"assets_dir={tiny_assets}",
        "epochs=1", "max_steps_per_epoch=1", "batch_size=4", "log_every_n_steps=1",
    )  # fmt: skip
    assert status == 0, out[-3000:]
    assert (tmp_path / "lora" / "epoch_0" / "model.safetensors").is_file()
