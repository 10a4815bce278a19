"""``mavl_finetune`` demo configs through the CLI: classification from a pretrained trunk (test
predictions scored by ``medtune score``) and ResUNet segmentation (MAVL's Dice in metrics.json)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from medtune.testing.mavl import build_cached_tiny_mavl

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
MEDTUNE = Path(sys.executable).parent / "medtune"


def _run(*args: str) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1", HF_HUB_OFFLINE="1")
    p = subprocess.run(
        [str(MEDTUNE), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return p.stdout + p.stderr


def test_classification_from_pretrained_trunk(tmp_path):
    from medtune.models.mavl import build_mavl
    from medtune.training.checkpointing import save_trained

    assets = build_cached_tiny_mavl()
    torch.manual_seed(1)
    pre = build_mavl(entities=["a"], n_concepts=2, text_width=8, block="basic", blocks=[1, 1, 1], width=4,
                     image_size=64, pool_heads=2, d_model=8, heads=2, num_layers=1, dim_feedforward=16)  # fmt: skip
    save_trained(
        {k: v.contiguous() for k, v in pre.state_dict().items()}, tmp_path / "pre", "x: 1\n"
    )
    out = tmp_path / "clf"
    text = _run("run", "mavl_finetune", "--config", "demo_classification", f"assets_dir={assets}",
                f"output_dir={out}", f"pretrained={tmp_path / 'pre'}", "label_fraction=0.5")  # fmt: skip
    assert (
        "classification: 8 training images (label_fraction 0.5)" in text
        and "test (best epoch" in text
    )
    m = json.loads((out / "metrics.json").read_text())
    assert (
        m["task"] == "classification" and m["best_epoch"] in (0, 1) and 0 <= m["auroc_macro"] <= 1
    )
    rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and set(rows[0]["scores"]) == {"Pneumonia"}
    assert "f1_max_mavl" in _run("score", str(out / "predictions.jsonl"))
    # the trunk started from the pretrained weights: after 4 small steps it is still close to them
    got = load_file(str(out / "epoch_0" / "model.safetensors"))
    w0 = pre.state_dict()["image.trunk.conv1.weight"]
    assert (got["trunk.conv1.weight"] - w0).abs().max() < 0.05 < w0.abs().max()


def test_segmentation_demo(tmp_path):
    out = tmp_path / "seg"
    text = _run("run", "mavl_finetune", "--config", "demo_segmentation", f"assets_dir={build_cached_tiny_mavl()}",
                f"output_dir={out}")  # fmt: skip
    m = json.loads((out / "metrics.json").read_text())
    assert m["task"] == "segmentation" and m["n_pos"] + m["n_neg"] == 12 and 0 <= m["dice"] <= 1
    assert "val_dice" in text and (out / "epoch_1" / "model.safetensors").is_file()
