"""tools/attention_map.py: the PNG exists, has the image's size, and the map changes with the text."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "attention_map.py"


def test_grad_cam_png_and_text_dependence(tiny_towers, tmp_path):
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import attention_map as am
    finally:
        sys.path.pop(0)
    from medtune.models.dual_encoder import open_clip_dual_encoder, tokenizer_for

    model = open_clip_dual_encoder(
        str(tiny_towers / "tiny_biomedclip"), str(tiny_towers / "tiny_bert")
    ).eval()
    image = (
        Image.open(tiny_towers / "tiny_captions" / "images" / "0000.png")
        .convert("RGB")
        .resize((80, 56))
    )
    a = am.grad_cam(model, tokenizer_for(model), image, "lesion in the upper left region.")
    b = am.grad_cam(model, tokenizer_for(model), image, "normal, no lesion.")
    assert a.shape == b.shape == (56, 80)
    assert a.min() >= 0 and a.max() <= 1 and a.max() > 0
    assert not np.array_equal(a, b)  # the map depends on the text

    img = tmp_path / "scan.png"
    image.save(img)
    out = tmp_path / "cam.png"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    p = subprocess.run([sys.executable, str(TOOL), "--model-dir", str(tiny_towers / "tiny_biomedclip"),
                        "--text-model-dir", str(tiny_towers / "tiny_bert"), "--image", str(img),
                        "--text", "lesion", "--out", str(out)], env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    assert Image.open(out).size == (80, 56)
    bad = subprocess.run([sys.executable, str(TOOL), "--model-dir", str(tmp_path), "--image", str(img),
                          "--text", "x", "--out", str(out)], env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert (
        bad.returncode == 1
        and "attention_map: error:" in bad.stderr
        and "Traceback" not in bad.stderr
    )
