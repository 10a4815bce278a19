"""open_clip towers in hub layout, offline, and BiomedCLIP's (see :mod:`medtune.models.encoders`)."""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from medtune.models.encoders.base import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    VisionEncoder,
    _fp32_default,
)

BIOMEDCLIP_REPO = "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
# Vision part of BiomedCLIP's published open_clip_config.json (timm ViT-B/16 at 224 px, CLS pooling
# by timm's default, linear projection to 512, CLIP mean/std).
BIOMEDCLIP_CONFIG: dict[str, Any] = {
    "model_cfg": {
        "embed_dim": 512,
        "vision_cfg": {
            "timm_model_name": "vit_base_patch16_224",
            "timm_model_pretrained": False,
            "timm_pool": "",
            "timm_proj": "linear",
            "image_size": 224,
        },
    },
    "preprocess_cfg": {"mean": list(OPENAI_CLIP_MEAN), "std": list(OPENAI_CLIP_STD)},
}

_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def _resolve_hub_dir(path: str) -> Path:
    """A local folder, or ``hf-hub:org/repo`` looked up in the HF cache without network."""
    if path.startswith("hf-hub:"):
        repo = path[len("hf-hub:") :]
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(repo, local_files_only=True))
        except Exception as e:  # noqa: BLE001 - re-raised with the user's key
            raise FileNotFoundError(
                f"{path}: not in the local Hugging Face cache ({os.environ.get('HF_HOME', '~/.cache/huggingface')}); "
                "medtune never downloads: fetch it once with `huggingface-cli download "
                f"{repo}` or pass the folder path"
            ) from e
    if path.startswith("local-dir:"):
        path = path[len("local-dir:") :]
    p = Path(path).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(
            f"open_clip model folder not found: {p} (expected open_clip_config.json + weights)"
        )
    return p


def read_open_clip_config(path: str) -> tuple[dict, Path]:
    """Read ``open_clip_config.json`` from a hub-layout folder. Returns (config, folder)."""
    folder = _resolve_hub_dir(path)
    cfg_file = folder / "open_clip_config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(
            f"{folder}: no open_clip_config.json (expected open_clip hub layout)"
        )
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_file}: malformed JSON: {e}") from None
    if "model_cfg" not in cfg or "vision_cfg" not in cfg["model_cfg"]:
        raise ValueError(f"{cfg_file}: missing model_cfg.vision_cfg")
    return cfg, folder


def load_visual_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """Read only the ``visual.*`` tensors of an open_clip checkpoint (safetensors or weights-only torch)."""
    for name in _WEIGHT_FILES:
        f = folder / name
        if f.is_file():
            if f.suffix == ".safetensors":
                from safetensors.torch import load_file

                sd = load_file(str(f))
            else:
                try:
                    sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
                except Exception as e:  # noqa: BLE001
                    raise ValueError(
                        f"{f}: cannot read weights ({e.__class__.__name__}: {e})"
                    ) from None
            if "state_dict" in sd:
                sd = sd["state_dict"]
            sd = {k.removeprefix("module."): v for k, v in sd.items()}
            visual = {k[len("visual.") :]: v for k, v in sd.items() if k.startswith("visual.")}
            if not visual:
                raise ValueError(f"{f}: no 'visual.*' weights found")
            return visual
    raise FileNotFoundError(
        f"{folder}: no weights file (expected one of {', '.join(_WEIGHT_FILES)})"
    )


def _build_open_clip_visual(
    config: dict,
    output: str,
    device: torch.device | str | None = None,
    feature_layer: int | None = None,
) -> VisionEncoder:
    from open_clip.model import _build_vision_tower

    mc = config["model_cfg"]
    vcfg = dict(mc["vision_cfg"])
    embed_dim = mc["embed_dim"]
    # device None: build where the caller's context says (e.g. ``with torch.device("meta")``)
    with torch.device(device) if device is not None else contextlib.nullcontext(), _fp32_default():
        visual = _build_vision_tower(embed_dim, vcfg, quick_gelu=mc.get("quick_gelu", False))
    size = vcfg.get("image_size", 224)
    size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    pre = config.get("preprocess_cfg", {})
    transform = {
        "image_size": size[0] if size[0] == size[1] else list(size),
        "mean": list(pre.get("mean", OPENAI_CLIP_MEAN)),
        "std": list(pre.get("std", OPENAI_CLIP_STD)),
    }
    for k in ("interpolation", "resize_mode"):
        if k in pre:
            transform[k] = pre[k]
    if vcfg.get("timm_model_name"):
        trunk = visual.trunk
        n_patch = math.prod(trunk.patch_embed.grid_size)
        tokens, dim = (1, embed_dim) if output == "pooled" else (n_patch, trunk.num_features)
        return VisionEncoder(
            visual,
            kind="open_clip_timm",
            output=output,
            num_tokens=tokens,
            out_dim=dim,
            transform=transform,
            feature_layer=feature_layer,
        )
    visual.output_tokens = True
    grid = visual.grid_size
    tokens, dim = (1, embed_dim) if output == "pooled" else (grid[0] * grid[1], vcfg["width"])
    return VisionEncoder(
        visual,
        kind="open_clip_vit",
        output=output,
        num_tokens=tokens,
        out_dim=dim,
        transform=transform,
        feature_layer=feature_layer,
    )


def open_clip_vision(
    path: str, output: str = "patch", load_weights: bool = True, feature_layer: int | None = None
) -> VisionEncoder:
    """The vision tower of an open_clip model in hub layout, offline.

    Args:
        path: a folder with ``open_clip_config.json`` (``local-dir:`` prefix allowed), or
            ``hf-hub:org/repo`` resolved in the local HF cache only.
        output: ``"patch"`` tokens or the ``"pooled"`` (projected) embedding.
        load_weights: read ``visual.*`` weights from the folder (False: random init).
        feature_layer: patch tokens of an inner block (see the module docstring).

    Returns:
        A :class:`VisionEncoder`.
    """
    config, folder = read_open_clip_config(path)
    enc = _build_open_clip_visual(config, output, feature_layer=feature_layer)
    if load_weights:
        sd = load_visual_state_dict(folder)
        missing, unexpected = enc.tower.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{folder}: visual weights do not match open_clip_config.json "
                f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})"
            )
    return enc


def biomedclip_vision(
    path: str | None = None,
    output: str = "patch",
    device: str | None = None,
    feature_layer: int | None = None,
) -> VisionEncoder:
    """BiomedCLIP's vision tower (timm ViT-B/16, 224 px; 512-d pooled, 768-d patch tokens).

    Args:
        path: the downloaded hub folder (or ``hf-hub:microsoft/BiomedCLIP-...`` in the HF cache);
            None builds from the published config with random weights (e.g. on ``device="meta"``).
        output: ``"patch"`` (196 tokens x 768) or ``"pooled"`` (1 token x 512).
        device: where to build when ``path`` is None.
        feature_layer: patch tokens of an inner block (see the module docstring).
    """
    if path is not None:
        return open_clip_vision(path, output=output, feature_layer=feature_layer)
    return _build_open_clip_visual(
        BIOMEDCLIP_CONFIG, output, device=device, feature_layer=feature_layer
    )
