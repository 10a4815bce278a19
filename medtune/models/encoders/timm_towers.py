"""timm towers: any timm model as an encoder, and a tiny SAM-style one for tests."""

from __future__ import annotations

from typing import Any

import torch

from medtune.models.encoders.base import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    VisionEncoder,
    _fp32_default,
)


def timm_vision(
    model_name: str,
    checkpoint_path: str | None = None,
    output: str = "patch",
    image_size: int | None = None,
    mean: list[float] | None = None,
    std: list[float] | None = None,
    feature_layer: int | None = None,
    **model_kwargs: Any,
) -> VisionEncoder:
    """Any timm model as an encoder (ViT, SAM's ``samvit_base_patch16``, ...), offline.

    Args:
        model_name: timm architecture name.
        checkpoint_path: weights file (safetensors or torch weights-only); None: random init.
        output: ``"patch"`` tokens or ``"pooled"``.
        image_size: input size (defaults to the model's); passed to timm as ``img_size``.
        mean, std: normalization (defaults to the model's pretrained config).
        feature_layer: patch tokens of an inner block (see the module docstring).
        **model_kwargs: passed to ``timm.create_model`` (e.g. ``depth``, ``embed_dim`` for tiny tests).
    """
    import timm

    if image_size is not None:
        model_kwargs["img_size"] = image_size
    with _fp32_default():
        model = timm.create_model(model_name, pretrained=False, num_classes=0, **model_kwargs)
    if checkpoint_path is not None:
        if checkpoint_path.endswith(".safetensors"):
            from safetensors.torch import load_file

            sd = load_file(checkpoint_path)
        else:
            sd = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
        missing, unexpected = model.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{checkpoint_path}: weights do not match timm '{model_name}' "
                f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})"
            )
    dc = model.pretrained_cfg
    size = image_size or dc.get("input_size", (3, 224, 224))[-1]
    transform = {
        "image_size": size,
        "mean": list(mean or dc.get("mean", OPENAI_CLIP_MEAN)),
        "std": list(std or dc.get("std", OPENAI_CLIP_STD)),
    }
    grid = model.patch_embed.grid_size
    tokens = 1 if output == "pooled" else grid[0] * grid[1]
    return VisionEncoder(
        model,
        kind="timm",
        output=output,
        num_tokens=tokens,
        out_dim=model.num_features,
        transform=transform,
        feature_layer=feature_layer,
    )


def tiny_sam_vision(image_size: int = 64):
    """A random 2-block SAM-style timm encoder for tests (of ``builders.tiny_msmedcap`` and
    ``blip2.builders.tiny_msmedcap_blip2``); moved here from ``models/blip2_connector.py``."""

    return timm_vision(
        "samvit_base_patch16",
        image_size=image_size,
        depth=2,
        embed_dim=32,
        num_heads=2,
        global_attn_indexes=(1,),
        window_size=2,
        neck_chans=24,
    )
