"""The encoder wrapper: a vision tower with a fixed token output (see :mod:`medtune.models.encoders`)."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class VisionEncoder(nn.Module):
    """A vision tower with a fixed token output.

    Args:
        tower: the wrapped module.
        kind: ``"open_clip_vit" | "open_clip_timm" | "timm"``: how to pull tokens from it.
        output: ``"patch" | "pooled"``.
        num_tokens: tokens per image this encoder yields.
        out_dim: width of each token.
        transform: image transform settings for :func:`medtune.data.images.image_transform`
            (``image_size``, ``mean``, ``std``, optional ``interpolation``, ``resize_mode``).
        feature_layer: patch tokens of this block (``hidden_states`` indexing, see the module
            docstring); None: the tower's final tokens.
    """

    def __init__(
        self,
        tower: nn.Module,
        *,
        kind: str,
        output: str,
        num_tokens: int,
        out_dim: int,
        transform: dict,
        feature_layer: int | None = None,
    ):
        super().__init__()
        if output not in ("patch", "pooled"):
            raise ValueError(f"encoder output must be 'patch' or 'pooled', got {output!r}")
        if feature_layer is not None:
            n = _num_blocks(tower, kind)
            if output != "patch" or n is None or not -n <= feature_layer < 0:
                raise ValueError(
                    f"feature_layer={feature_layer}: needs output='patch' on a ViT tower and a "
                    f"negative index in [-{n}, -1] (transformers' hidden_states indexing)"
                )
        self.feature_layer = feature_layer
        self.tower = tower
        self.kind = kind
        self.output = output
        self.num_tokens = num_tokens
        self.out_dim = out_dim
        self.transform = dict(transform)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Args: images [b, 3, H, W] (normalized). Returns: tokens [b, num_tokens, out_dim]."""
        t = self.tower
        if self.feature_layer is not None:
            return self._block_tokens(images)
        if self.kind == "open_clip_vit":
            pooled, tokens = t(images)
            out = pooled[:, None, :] if self.output == "pooled" else tokens
        elif self.kind == "open_clip_timm":
            if self.output == "pooled":
                out = t(images)[:, None, :]
            else:
                out = _timm_patch_tokens(t.trunk, images)
        else:
            if self.output == "pooled":
                out = t.forward_head(t.forward_features(images), pre_logits=True)[:, None, :]
            else:
                out = _timm_patch_tokens(t, images)
        return out

    def _block_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Patch tokens after block ``n + feature_layer`` (no final norm, prefix tokens dropped)."""
        index = [_num_blocks(self.tower, self.kind) + self.feature_layer]
        if self.kind == "open_clip_vit":
            out = self.tower.forward_intermediates(
                images, indices=index, stop_early=True, intermediates_only=True, output_fmt="NLC"
            )
            return out["image_intermediates"][0]
        trunk = self.tower.trunk if self.kind == "open_clip_timm" else self.tower
        return trunk.forward_intermediates(
            images,
            indices=index,
            norm=False,
            stop_early=True,
            intermediates_only=True,
            output_fmt="NLC",
        )[0]

    def unused_parameters(self) -> set[str]:
        """Names (relative to this module) of tower parameters the chosen output never uses:
        the pooled head / projection when patch tokens are taken. They stay frozen, so a trained
        encoder does not count (or hold optimizer state for) weights that get no gradient."""
        if self.output == "pooled":
            return set()
        heads = {"open_clip_vit": ("tower.proj",), "open_clip_timm": ("tower.head.",)}
        heads = heads.get(self.kind, ("tower.head.", "tower.fc_norm."))
        if self.feature_layer is not None:  # the final norm and the blocks after the chosen one
            n = _num_blocks(self.tower, self.kind)
            prefix = {"open_clip_vit": "tower.", "open_clip_timm": "tower.trunk."}
            prefix = prefix.get(self.kind, "tower.")
            blocks = "transformer.resblocks" if self.kind == "open_clip_vit" else "blocks"
            late = tuple(f"{prefix}{blocks}.{i}." for i in range(n + self.feature_layer + 1, n))
            final = (prefix + "ln_post.",) if self.kind == "open_clip_vit" else (prefix + "norm.",)
            heads = (*heads, *late, *final)
        return {n for n, _ in self.named_parameters() if n.startswith(heads) or n in heads}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Turn on activation checkpointing inside the tower where it supports it."""
        target = self.tower.trunk if self.kind == "open_clip_timm" else self.tower
        if hasattr(target, "set_grad_checkpointing"):
            target.set_grad_checkpointing(enable)


def _num_blocks(tower: nn.Module, kind: str) -> int | None:
    """Transformer blocks of a ViT tower (None for towers without a block list, e.g. ResNets)."""
    if kind == "open_clip_vit":
        blocks = getattr(getattr(tower, "transformer", None), "resblocks", None)
    else:
        blocks = getattr(tower.trunk if kind == "open_clip_timm" else tower, "blocks", None)
    return None if blocks is None else len(blocks)


@contextlib.contextmanager
def _fp32_default():
    """Build towers in fp32 whatever the caller's default dtype (a recipe may build the whole model
    under bf16 for the frozen LLM): pretrained weights then load without bf16 rounding, and trained
    encoders keep fp32 master weights."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _timm_patch_tokens(trunk: nn.Module, images: torch.Tensor) -> torch.Tensor:
    feats = trunk.forward_features(images)
    if feats.ndim == 4:  # [b, C, H, W] (e.g. SAM's neck output) -> [b, H*W, C]
        return feats.flatten(2).transpose(1, 2)
    return feats[:, getattr(trunk, "num_prefix_tokens", 1) :]
