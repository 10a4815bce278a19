"""CLIP-style dual encoders: an image tower and a text tower from any open_clip model, offline.

- :func:`open_clip_dual_encoder`: both towers of an open_clip model in hub layout
  (``open_clip_config.json`` + ``open_clip_pytorch_model.bin`` / ``open_clip_model.safetensors``).
  BiomedCLIP's config names its PubMedBERT text tower by HF id; ``text_model_dir`` points that at a
  local HF folder (``config.json`` + tokenizer files), so nothing touches the network.
- :func:`dual_encoder_from_towers`: towers named by config (an open_clip ``model_cfg`` dict, e.g. a
  timm ViT + an HF BERT whose weights load from ``text_model_dir``).
- :func:`export_open_clip`: the (tuned) model back in hub layout, so ``open_clip.create_model_and_
  transforms('local-dir:...')`` and :func:`medtune.models.encoders.open_clip_vision` load it.

A :class:`DualEncoder` returns L2-normalised features and the temperature; with
``with_tokens=True`` also the towers' token outputs, which the optional :class:`ITMHead` (BLIP /
ALBEF image-text matching) fuses.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from medtune.models.dual_tokenizer import (
    _TOKENIZER_FILES,
    DualTokenizer,
    TowerConfigError,
    _tokenizer_dir,
    dual_tokenizer,
)
from medtune.models.encoders import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, read_open_clip_config


def _text_cfg(config: dict, text_model_dir: str | None) -> dict:
    """The text_cfg with ``hf_model_name`` pointed at a local folder (weights come from the
    open_clip checkpoint or ``text_model_dir``, never from the hub)."""
    tc = dict(config["model_cfg"].get("text_cfg") or {})
    if not tc:
        raise TowerConfigError(
            "model_cfg.text_cfg is missing: this open_clip model has no text tower"
        )
    if tc.get("hf_model_name"):
        name = text_model_dir or tc["hf_model_name"]
        if not Path(name).is_dir():
            raise TowerConfigError(
                f"text tower '{tc['hf_model_name']}' is a Hugging Face id and medtune never downloads: "
                "set text_model_dir to a local folder of that model (config.json + tokenizer files)"
            )
        if not (Path(name) / "config.json").is_file():
            raise TowerConfigError(
                f"text_model_dir {name}: no config.json (expected a HF model folder)"
            )
        tc["hf_model_name"] = str(name)
        tc["hf_model_pretrained"] = False
    return tc


def build_open_clip_model(config: dict, text_model_dir: str | None = None) -> nn.Module:
    """A randomly initialised open_clip ``CLIP`` / ``CustomTextCLIP`` from a config dict.

    Args:
        config: the content of ``open_clip_config.json`` (``model_cfg``, ``preprocess_cfg``).
        text_model_dir: local HF folder for an ``hf_model_name`` text tower.
    """
    from open_clip.model import CLIP, CustomTextCLIP

    from medtune.models.encoders.base import _fp32_default

    mc = copy.deepcopy(config["model_cfg"])
    mc["text_cfg"] = _text_cfg(config, text_model_dir)
    custom = mc.pop("custom_text", False) or bool(mc["text_cfg"].get("hf_model_name"))
    with _fp32_default():
        return (CustomTextCLIP if custom else CLIP)(**mc)


class ITMHead(nn.Module):
    """Image-text matching head (BLIP / ALBEF): text tokens cross-attend to image tokens.

    Args:
        image_width: width of the image tower's tokens.
        text_width: width of the text tower's tokens.
        width: fusion width; heads, layers: of the fusion transformer.
    """

    def __init__(
        self, image_width: int, text_width: int, width: int = 64, heads: int = 2, layers: int = 1
    ):
        super().__init__()
        self.image_proj = nn.Linear(image_width, width)
        self.text_proj = nn.Linear(text_width, width)
        layer = nn.TransformerDecoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True)
        self.fusion = nn.TransformerDecoder(layer, layers)
        self.head = nn.Linear(width, 2)

    def forward(
        self, image_tokens: torch.Tensor, text_tokens: torch.Tensor, text_mask: torch.Tensor
    ) -> torch.Tensor:
        """Args: image_tokens [b, n, wi]; text_tokens [b, L, wt]; text_mask bool [b, L] (True = real).

        Returns: logits [b, 2] (index 1 = the pair matches)."""
        x = self.fusion(
            self.text_proj(text_tokens),
            self.image_proj(image_tokens),
            tgt_key_padding_mask=~text_mask,
        )
        return self.head(x[:, 0])


class DualEncoder(nn.Module):
    """An open_clip model's two towers (+ an optional ITM head) with a fixed interface.

    Args:
        clip: an open_clip ``CLIP`` or ``CustomTextCLIP``.
        config: its ``open_clip_config.json`` content (kept for export).
        itm: add an :class:`ITMHead`; itm_width: its fusion width.
    """

    def __init__(self, clip: nn.Module, config: dict, *, itm: bool = False, itm_width: int = 64):
        super().__init__()
        self.clip = clip
        self.config = copy.deepcopy(config)
        self.hf_text = (
            hasattr(clip, "text")
            and hasattr(clip.text, "transformer")
            and hasattr(clip.text, "pooler")
        )
        if hasattr(clip.visual, "output_tokens"):
            clip.visual.output_tokens = True  # native ViT: (pooled, tokens) in one pass
        pre = config.get("preprocess_cfg", {})
        size = config["model_cfg"]["vision_cfg"].get("image_size", 224)
        self.transform = {
            "image_size": size,
            "mean": list(pre.get("mean", OPENAI_CLIP_MEAN)),
            "std": list(pre.get("std", OPENAI_CLIP_STD)),
        }
        for k in ("interpolation", "resize_mode"):
            if k in pre:
                self.transform[k] = pre[k]
        self.itm = ITMHead(self.image_width, self.text_width, width=itm_width) if itm else None

    # ----------------------------------------------------------------------------- widths
    @property
    def embed_dim(self) -> int:
        return int(self.config["model_cfg"]["embed_dim"])

    @property
    def image_width(self) -> int:
        v = self.clip.visual
        return v.trunk.num_features if hasattr(v, "trunk") else v.transformer.width

    @property
    def text_width(self) -> int:
        c = self.clip
        return (
            c.text.config.hidden_size
            if self.hf_text
            else (c.text if hasattr(c, "text") else c).transformer.width
        )

    @property
    def pad_id(self) -> int:
        if self.hf_text:
            return int(self.clip.text.config.pad_token_id or 0)
        return int(getattr(getattr(self.clip, "text", self.clip), "pad_id", 0))

    # ----------------------------------------------------------------------------- towers
    def image_tower(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: images [b, 3, H, W]. Returns: (pooled [b, embed_dim] unnormalised, tokens [b, n, wi])."""
        v = self.clip.visual
        if hasattr(v, "trunk"):  # open_clip TimmModel: trunk features, then its pool + head
            feats = v.trunk.forward_features(images)
            pooled = v.head(v.trunk.forward_head(feats))
            return pooled, feats
        pooled, tokens = v(images)
        return pooled, tokens

    def text_tower(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Args: tokens int [b, L]. Returns: (pooled [b, embed_dim], token states [b, L, wt],
        mask bool [b, L])."""
        c = self.clip
        mask = tokens != self.pad_id
        if self.hf_text:
            t = c.text
            out = t.transformer(input_ids=tokens, attention_mask=mask.long())
            pooled = t.proj(t.pooler(out, mask.long()))
            return pooled, out.last_hidden_state, mask
        from open_clip.transformer import text_global_pool

        m = c.text if hasattr(c, "text") else c  # CustomTextCLIP's TextTransformer, or CLIP itself
        if hasattr(c, "text"):
            m.output_tokens = True
            pooled, states = m(tokens)
            return pooled, states, mask
        x = m.token_embedding(tokens) + m.positional_embedding
        x = m.ln_final(m.transformer(x, attn_mask=m.attn_mask))
        pooled = text_global_pool(
            x, tokens, m.text_pool_type, eos_token_id=getattr(m, "text_eos_id", None)
        )
        pooled = (
            m.text_projection(pooled)
            if isinstance(m.text_projection, nn.Linear)
            else pooled @ m.text_projection
        )
        return pooled, x, mask

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Args: images [b, 3, H, W]. Returns: features [b, embed_dim] (L2-normalised by default;
        the signature of open_clip's, so its zero-shot helpers take this model)."""
        x = self.image_tower(images)[0]
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Args: tokens int [b, L]. Returns: features [b, embed_dim] (L2-normalised by default)."""
        x = self.text_tower(tokens)[0]
        return F.normalize(x, dim=-1) if normalize else x

    def logit_scale(self) -> torch.Tensor:
        """exp(learned log-scale), clamped at 100 as open_clip's training does. Returns: scalar."""
        return self.clip.logit_scale.exp().clamp(max=100.0)

    def forward(
        self, images: torch.Tensor, tokens: torch.Tensor, with_tokens: bool = False
    ) -> dict[str, torch.Tensor]:
        """Args: images [b, 3, H, W]; tokens int [b, L].

        Returns: ``image_features`` [b, d], ``text_features`` [b, d] (L2-normalised),
        ``logit_scale`` scalar; with ``with_tokens``: ``image_tokens`` [b, n, wi],
        ``text_tokens`` [b, L, wt], ``text_mask`` bool [b, L]."""
        ip, it = self.image_tower(images)
        tp, tt, tm = self.text_tower(tokens)
        out = {
            "image_features": F.normalize(ip, dim=-1),
            "text_features": F.normalize(tp, dim=-1),
            "logit_scale": self.logit_scale(),
        }
        if with_tokens:
            out.update(image_tokens=it, text_tokens=tt, text_mask=tm)
        return out


def _weights_file(folder: Path) -> Path | None:
    for name in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
        if (folder / name).is_file():
            return folder / name
    return None


def open_clip_dual_encoder(
    path: str,
    text_model_dir: str | None = None,
    load_weights: bool = True,
    itm: bool = False,
    itm_width: int = 64,
) -> DualEncoder:
    """Both towers of an open_clip hub-layout folder (or ``hf-hub:org/repo`` in the HF cache).

    Args:
        path: the folder (``local-dir:`` prefix allowed).
        text_model_dir: a local HF folder for an ``hf_model_name`` text tower (BiomedCLIP).
        load_weights: read the full checkpoint (False: random init).
        itm: add an ITM head (randomly initialised); itm_width: its fusion width.
    """
    from open_clip.factory import load_checkpoint

    config, folder = read_open_clip_config(path)
    model = DualEncoder(
        build_open_clip_model(config, text_model_dir), config, itm=itm, itm_width=itm_width
    )
    model.folder = folder
    model.text_model_dir = text_model_dir
    if load_weights:
        f = _weights_file(folder)
        if f is None:
            raise FileNotFoundError(
                f"{folder}: no open_clip_model.safetensors or open_clip_pytorch_model.bin"
            )
        try:
            load_checkpoint(model.clip, str(f), strict=True, weights_only=True)
        except RuntimeError as e:
            raise TowerConfigError(
                f"{f}: weights do not match open_clip_config.json ({str(e)[:300]})"
            ) from None
    return model


def dual_encoder_from_towers(
    model_cfg: dict,
    text_model_dir: str | None = None,
    text_pretrained: bool = True,
    preprocess_cfg: dict | None = None,
    itm: bool = False,
    itm_width: int = 64,
) -> DualEncoder:
    """Towers named by config: an open_clip ``model_cfg`` (``embed_dim``, ``vision_cfg``,
    ``text_cfg``), built randomly except an HF text tower, whose weights load from
    ``text_model_dir`` when ``text_pretrained``."""
    config = {"model_cfg": dict(model_cfg), "preprocess_cfg": dict(preprocess_cfg or {})}
    model = DualEncoder(
        build_open_clip_model(config, text_model_dir), config, itm=itm, itm_width=itm_width
    )
    model.folder = None
    model.text_model_dir = text_model_dir
    if text_pretrained and model.hf_text:
        from transformers import AutoModel

        hf = AutoModel.from_pretrained(text_model_dir, add_pooling_layer=False)
        model.clip.text.transformer.load_state_dict(hf.state_dict(), strict=True)
    return model


def tokenizer_for(model: DualEncoder) -> DualTokenizer:
    """The tokenizer matching a model built by this module (a ``_component_`` for configs that
    take ``model`` first: ``tokenizer: {_component_: medtune.models.dual_encoder.tokenizer_for}``)."""
    return dual_tokenizer(
        model.config, getattr(model, "folder", None), getattr(model, "text_model_dir", None)
    )


def export_open_clip(
    model: DualEncoder,
    out_dir: str | Path,
    state_dict: dict[str, torch.Tensor] | None = None,
    text_model_name: str | None = None,
    safetensors: bool = False,
) -> Path:
    """Write ``model`` in open_clip hub layout: ``open_clip_config.json`` + weights + tokenizer files.

    Args:
        model: the dual encoder (its ``clip`` weights are written; the ITM head is not open_clip's).
        out_dir: the folder to write.
        state_dict: ``clip.*``-stripped weights to write instead of the model's (e.g. gathered shards).
        text_model_name: what to write as ``text_cfg.hf_model_name`` (default: the source config's,
            e.g. BiomedCLIP's hub id, so the folder loads wherever BiomedCLIP does).
        safetensors: write ``open_clip_model.safetensors`` instead of ``open_clip_pytorch_model.bin``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(model.config)
    tc = config["model_cfg"].get("text_cfg", {})
    if text_model_name and tc.get("hf_model_name"):
        tc["hf_model_name"] = text_model_name
    tc.pop("hf_model_pretrained", None)
    sd = state_dict if state_dict is not None else model.clip.state_dict()
    sd = {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}
    if safetensors:
        from safetensors.torch import save_file

        save_file(sd, str(out / "open_clip_model.safetensors"))
    else:
        torch.save(sd, out / "open_clip_pytorch_model.bin")
    (out / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    src = _tokenizer_dir(getattr(model, "folder", None), getattr(model, "text_model_dir", None))
    if src and model.hf_text:
        for name in _TOKENIZER_FILES:
            if (Path(src) / name).is_file():
                shutil.copy(Path(src) / name, out / name)
    return out
