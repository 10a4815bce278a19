"""Grad-CAM of a dual encoder's image-text score over the image tower's last block, as a PNG overlay.

    python tools/attention_map.py --checkpoint outputs/contrastive_pretrain_demo/epoch_1 \\
        --text-model-dir assets/tiny_towers/tiny_bert --image scan.png --text "lesion in the upper left" --out cam.png
    python tools/attention_map.py --model-dir /models/BiomedCLIP-... --text-model-dir /models/BiomedBERT ...

The score is the cosine of the image and text features; Grad-CAM weights each channel of the
patch tokens entering the last block by its mean gradient, keeps the positive part of the weighted sum, upsamples it
to the image's size and overlays it in red (what the brain-VLP seed's ``vis.py`` shows). The PNG
has the input image's size. ``--checkpoint`` is a ``contrastive_pretrain`` folder (``epoch_k/``,
its ``open_clip/`` export is loaded).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from medtune.utils.errors import UserError, run_entry


def _last_block(model):
    v = model.clip.visual
    if hasattr(v, "trunk"):
        return v.trunk.blocks[-1], getattr(v.trunk, "num_prefix_tokens", 1)
    return v.transformer.resblocks[-1], 0 if getattr(v, "pool_type", "tok") == "none" else 1


def grad_cam(model, tokenizer, image: Image.Image, text: str) -> np.ndarray:
    """Returns: float32 [H, W] in [0, 1] at the image's size (the Grad-CAM of cos(image, text))."""
    from medtune.data.images import image_transform

    block, n_prefix = _last_block(model)
    x = image_transform(**model.transform)(image)[None]
    acts = {}

    def hook(_m, inputs):
        # the tokens the last block attends over: with CLS pooling its *output* patch tokens get
        # no gradient, its input ones do (the usual Grad-CAM layer for ViTs)
        inputs[0].retain_grad()
        acts["a"] = inputs[0]

    h = block.register_forward_pre_hook(hook)
    try:
        model.zero_grad()
        score = (model.encode_image(x) * model.encode_text(tokenizer([text]))).sum()
        score.backward()
    finally:
        h.remove()
    a = acts["a"]
    if a.shape[0] != 1:  # sequence-first blocks: [n, 1, w]
        a_, g = a.transpose(0, 1), a.grad.transpose(0, 1)
    else:
        a_, g = a, a.grad
    a_, g = a_[0, n_prefix:].detach(), g[0, n_prefix:]
    cam = torch.relu((a_ * g.mean(0)).sum(-1))  # [n_patch]
    side = int(round(cam.numel() ** 0.5))
    cam = cam[: side * side].reshape(1, 1, side, side)
    cam = F.interpolate(
        cam, size=(image.height, image.width), mode="bilinear", align_corners=False
    )[0, 0]
    cam = cam - cam.min()
    return (cam / cam.max().clamp(min=1e-12)).numpy().astype(np.float32)


def overlay(image: Image.Image, cam: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """Red heat over the image. Returns: RGB image of the image's size."""
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    heat = np.zeros_like(base)
    heat[..., 0] = 255 * cam
    out = (1 - alpha * cam[..., None]) * base + alpha * cam[..., None] * heat
    return Image.fromarray(out.clip(0, 255).astype(np.uint8))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a contrastive_pretrain checkpoint folder (epoch_k/)")
    src.add_argument("--model-dir", help="an open_clip hub folder")
    p.add_argument("--text-model-dir", help="local HF folder of an hf_model_name text tower")
    p.add_argument("--image", required=True)
    p.add_argument("--text", required=True)
    p.add_argument("--out", required=True, help="PNG to write")
    args = p.parse_args(argv)
    from medtune.data.images import load_image
    from medtune.models.dual_encoder import open_clip_dual_encoder, tokenizer_for

    folder = Path(args.checkpoint) / "open_clip" if args.checkpoint else Path(args.model_dir)
    if not (folder / "open_clip_config.json").is_file():
        raise UserError(
            f"{folder}: no open_clip_config.json (expected a checkpoint with an open_clip/ export)"
        )
    model = open_clip_dual_encoder(str(folder), args.text_model_dir).eval()
    image = load_image(args.image)
    cam = grad_cam(model, tokenizer_for(model), image, args.text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    overlay(image, cam).save(args.out)
    print(f"wrote {args.out} ({image.width}x{image.height})")
    return 0


if __name__ == "__main__":
    sys.exit(run_entry("attention_map", main))
