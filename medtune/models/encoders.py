"""Image towers. Each returns tokens ``[b, n, d]`` and names its image transform.

- :func:`open_clip_vision`: the vision tower of any open_clip model in hub layout
  (``open_clip_config.json`` + ``open_clip_pytorch_model.bin`` / ``open_clip_model.safetensors``),
  from a local folder or, offline, from the HF cache (``hf-hub:org/repo``). Only the visual tower
  is built and only ``visual.*`` weights are read, so BiomedCLIP never needs its PubMedBERT tower.
- :func:`biomedclip_vision`: BiomedCLIP's tower; builds from its published config without files
  (for the ``meta`` device) and loads weights when given the folder.
- :func:`timm_vision`: any timm model (ViT, SAM's image encoder ``samvit_*``), weights from a file.

``output="patch"`` yields the patch tokens (CLS and other prefix tokens dropped); ``"pooled"``
yields one token, the model's pooled (for open_clip: projected) embedding.

``feature_layer`` (patch output of a ViT only) takes the patch tokens of an inner block instead of
the tower's final normalized tokens, indexed as LLaVA / transformers index ``hidden_states``:
``-1`` is the last block's output *before* the final LayerNorm, ``-2`` the block before it
(LLaVA-1.5's choice). None (default) keeps the tokens after the final norm. A MedVLM exports to
transformers' LLaVA exactly only with a ``feature_layer`` (LLaVA selects a hidden state, which
never carries the final norm).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

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
