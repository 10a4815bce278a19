"""tools/attention_map.py, BLIP mode: Grad-CAM on the ITM cross-attention of a tiny BLIP checkpoint
folder (config.yaml + model.safetensors, as blip_retrieval writes them): the PNGs have the
image's size, one per word piece with ``--per-word``, and the map depends on the caption."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from medtune.utils.errors import run_entry

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def am():
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import attention_map
    finally:
        sys.path.pop(0)
    return attention_map


@pytest.fixture(scope="module")
def blip_ckpt(tiny_towers, tmp_path_factory):
    from torchtune import config

    from medtune.models.blip.state import blip_state
    from medtune.training.checkpointing import save_trained

    cfg = OmegaConf.load(REPO / "recipes/configs/blip_retrieval/demo.yaml")
    cfg.bert_dir = str(tiny_towers / "tiny_bert")
    cfg.model.dropout = 0.0
    torch.manual_seed(0)
    model = config.instantiate(cfg.model, vision=config.instantiate(cfg.encoder), decoder=False)
    folder = tmp_path_factory.mktemp("blip_ckpt") / "epoch_0"
    save_trained(blip_state(model), folder, OmegaConf.to_yaml(cfg, resolve=True))
    return folder


def test_blip_grad_cam_has_the_image_size_and_depends_on_the_text(am, blip_ckpt, tmp_path):
    from medtune.viz.blip_attention import load_blip_checkpoint_folder

    model, tok, max_length = load_blip_checkpoint_folder(blip_ckpt, {})
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8))
    a, words = am.blip_grad_cam(model, tok, image, "lesion in the upper left", layer=8)
    b, _ = am.blip_grad_cam(model, tok, image, "normal chest x ray", layer=8)  # clamped to 0
    assert a.shape == b.shape == (40, 56) and a.dtype == np.float32
    assert a.min() >= 0 and a.max() <= 1 and a.max() == pytest.approx(1.0)
    assert [w for w, _ in words] == ["lesion", "in", "the", "upper", "left"]
    assert not np.allclose(a, b)
    assert not np.allclose(words[0][1], words[3][1])

    img = tmp_path / "scan.png"
    image.save(img)
    out = tmp_path / "cam.png"
    args = ["--checkpoint", str(blip_ckpt), "--image", str(img), "--text", "mass on the right",
            "--out", str(out), "--per-word"]  # fmt: skip
    assert run_entry("attention_map", lambda: am.main(args)) == 0
    assert Image.open(out).size == (56, 40)
    assert sorted(p.name for p in tmp_path.glob("cam_*.png")) == [
        "cam_0_mass.png", "cam_1_on.png", "cam_2_the.png", "cam_3_right.png",
    ]  # fmt: skip
