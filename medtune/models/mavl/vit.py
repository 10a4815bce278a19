"""MAVL's ViT image side: a ViT tower's patch tokens as the decoder's keys, its CLS token as the
global feature, both projected to ``d_model``.

Followed: ``Pretrain/models/model_MAVL.py`` of HieuPhan33/CVPR2024_MAVL (``_get_basemodel`` for
``ViT-B/16`` / ``timm-*`` and ``image_encoder``): the tower's tokens after its final LayerNorm
(torchvision's ``encoder.ln``; for ``timm-*`` models the output of the block named in ``layers``),
``global_fea = tokens[:, 0]`` through ``global_l = Linear(768, d_model)`` when ``d_model != 768``,
the patch tokens reshaped to their ``h x h`` grid and projected by the same ``res_l1`` (1x1 conv +
PReLU) and ``res_l2`` (1x1 conv to ``d_model``) as the ResNet variant. MAVL's configs all use
ResNet-50; its ViT branch has no released weights.

The tower is any medtune :class:`~medtune.models.encoders.VisionEncoder` with CLS + patch tokens:
a timm ViT (:func:`~medtune.models.encoders.timm_vision`), an open_clip ViT or BiomedCLIP
(:func:`~medtune.models.encoders.open_clip_vision`, :func:`~medtune.models.encoders.biomedclip_vision`).
Its ``feature_layer`` (``-k``: the k-th block from the end, before the final norm, as MAVL's
``timm-*`` ``layers``) is honoured. The tower's own projection head (open_clip ``proj`` / ``head``)
is not used and is frozen, so DDP sees no parameter without a gradient.
"""

from __future__ import annotations

import importlib

import torch
from torch import nn

from medtune.models.encoders.base import VisionEncoder, _num_blocks


def instantiate_vision(spec) -> VisionEncoder:
    """A :class:`VisionEncoder` from a ``{_component_: dotted.path, **kwargs}`` mapping (configs name
    the tower this way: ``model.vision``), or the encoder itself."""
    if isinstance(spec, nn.Module):
        return spec
    spec = dict(spec)
    path = spec.pop("_component_", None)
    if not isinstance(path, str) or "." not in path:
        raise ValueError(
            "model.vision: expected a mapping with _component_ (e.g. "
            "medtune.models.encoders.biomedclip_vision) and its arguments"
        )
    mod, _, name = path.rpartition(".")
    enc = getattr(importlib.import_module(mod), name)(**spec)
    if not isinstance(enc, VisionEncoder):
        raise ValueError(f"model.vision: {path} returned {type(enc).__name__}, not a VisionEncoder")
    return enc


class MAVLViTImageEncoder(nn.Module):
    """ViT tower -> (patch features ``[B, d_model, s, s]``, global feature ``[B, d_model]``).

    Args:
        tower: a patch-output :class:`VisionEncoder` of kind ``timm``, ``open_clip_timm`` or
            ``open_clip_vit`` on a square patch grid.
        d_model: width of the query decoder.

    Attributes: ``grid`` (s), ``image_size``, ``mean``, ``std`` (the tower's transform).
    """

    def __init__(self, tower: VisionEncoder, d_model: int) -> None:
        super().__init__()
        if tower.kind not in ("timm", "open_clip_timm", "open_clip_vit") or tower.output != "patch":
            raise ValueError(f"model.vision: a patch-output ViT tower is needed, got kind "
                             f"{tower.kind!r} output {tower.output!r}")  # fmt: skip
        if _num_blocks(tower.tower, tower.kind) is None:
            raise ValueError("model.vision: the tower has no transformer blocks (not a ViT)")
        grid = int(round(tower.num_tokens**0.5))
        if grid * grid != tower.num_tokens:
            raise ValueError(f"model.vision: {tower.num_tokens} patch tokens are not a square grid")
        unused = tower.unused_parameters()  # the tower's projection head: never used here
        for n, p in tower.named_parameters():
            if n in unused:
                p.requires_grad_(False)
        c = tower.out_dim
        self.tower = tower
        self.grid = grid
        size = tower.transform["image_size"]
        self.image_size = size if isinstance(size, int) else int(size[0])
        self.mean, self.std = list(tower.transform["mean"]), list(tower.transform["std"])
        self.global_proj = nn.Linear(c, d_model) if c != d_model else nn.Identity()
        self.proj1 = nn.Sequential(nn.Conv2d(c, c, kernel_size=1), nn.PReLU())
        self.proj2 = nn.Conv2d(c, d_model, kernel_size=1)

    def tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (CLS ``[B, C]``, patch tokens ``[B, P, C]``): after the final norm, or the raw
        output of block ``feature_layer``."""
        enc = self.tower
        last = enc.feature_layer is None
        index = [_num_blocks(enc.tower, enc.kind) + (-1 if last else enc.feature_layer)]
        if enc.kind == "open_clip_vit":
            out = enc.tower.forward_intermediates(
                images, indices=index, stop_early=True, normalize_intermediates=last,
                intermediates_only=True, output_fmt="NLC", output_extra_tokens=True,
            )  # fmt: skip
            return out["image_intermediates_prefix"][0][:, 0], out["image_intermediates"][0]
        trunk = enc.tower.trunk if enc.kind == "open_clip_timm" else enc.tower
        patches, prefix = trunk.forward_intermediates(
            images, indices=index, norm=last, stop_early=True, intermediates_only=True,
            output_fmt="NLC", return_prefix_tokens=True,
        )[0]  # fmt: skip
        return prefix[:, 0], patches

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cls, patches = self.tokens(images)
        b, p, c = patches.shape
        grid = patches.transpose(1, 2).reshape(b, c, self.grid, self.grid)
        return self.proj2(self.proj1(grid)), self.global_proj(cls)
