"""Start from a transformers LLaVA folder: its tower, projector and LLM as a MedVLM.

A ``LlavaForConditionalGeneration`` folder (``config.json`` of ``model_type: llava``,
``model.safetensors`` or an index of shards, ``preprocessor_config.json``) becomes:

- the encoder: an open_clip ``VisionTransformer`` for a ``clip_vision_model`` tower (LLaVA-1.5,
  LLaVA-Med v1.5: CLIP ViT-L/14-336) or a timm ViT for a ``vit`` tower, reading the patch tokens
  of ``vision_feature_layer`` (strategy ``default``: CLS dropped), with the image transform of the
  folder's image processor (``shortest_edge`` + center crop -> resize mode ``crop``, height/width
  -> ``squash``);
- the connector: an ``mlp`` connector holding ``multi_modal_projector`` (its activation as the
  config says: ``gelu``, or none for ``linear``);
- the LLM: the family decoder shaped by ``text_config`` (Llama-3, Llama-2 / Vicuna, Mistral, Qwen2.5),
  its weights read by :class:`LlavaLLMCheckpointer` (the recipes' ``checkpointer``).

The placeholder id is medtune's rule for the LLM family (:mod:`medtune.models.llm.placeholder`),
not LLaVA's ``<image>`` id: MedVLM replaces placeholder embeddings, so the token's own embedding is
never read. Weight names are mapped in :mod:`medtune.models.convert.hf_llava`.
"""

from __future__ import annotations

import json
import tempfile
from functools import partial
from pathlib import Path

import torch
from torch import nn

from medtune.models.connectors import MLPConnector
from medtune.models.convert.hf_llava import (
    PROJ,
    VISION,
    llm_from_hf,
    projector_from_hf,
    read_llava_weights,
    vision_from_hf,
)
from medtune.models.encoders.base import VisionEncoder, _fp32_default
from medtune.models.llama3 import head_layout
from medtune.models.lora import _decoder, _takes_lora_args
from medtune.models.medvlm import MedVLM
from medtune.utils.errors import UserError

_INTERP = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box"}


def read_llava_config(path: str | Path) -> dict:
    """The folder's ``config.json`` as a dict, checked to be a LLaVA config."""
    f = Path(path) / "config.json"
    if not f.is_file():
        raise UserError(f"{path}: no config.json (expected a transformers LLaVA folder)")
    cfg = json.loads(f.read_text())
    if cfg.get("model_type") != "llava":
        raise UserError(f"{f}: model_type {cfg.get('model_type')!r}, expected 'llava'")
    if cfg.get("vision_feature_select_strategy", "default") != "default":
        raise UserError(
            f"{f}: vision_feature_select_strategy {cfg['vision_feature_select_strategy']!r}: "
            "medtune's patch output drops the CLS token (strategy 'default')"
        )
    if not isinstance(cfg.get("vision_feature_layer", -2), int):
        raise UserError(f"{f}: several vision_feature_layer values are not supported")
    return cfg


def _transform(path: Path, image_size: int) -> dict:
    f = path / "preprocessor_config.json"
    pre = json.loads(f.read_text()) if f.is_file() else {}
    size = pre.get("size", {"shortest_edge": image_size})
    # transformers' CLIP processor default (and LLaVA's): shorter side, then a center crop
    squash = "height" in size and not pre.get("do_center_crop", True)
    mode = "squash" if squash else "crop"
    return {
        "image_size": image_size,
        "mean": list(pre.get("image_mean", (0.48145466, 0.4578275, 0.40821073))),
        "std": list(pre.get("image_std", (0.26862954, 0.26130258, 0.27577711))),
        "interpolation": _INTERP.get(pre.get("resample", 3), "bicubic"),
        "resize_mode": mode,
    }


def _tower(vc: dict) -> tuple[nn.Module, str]:
    """Build the vision tower (random weights) for a LLaVA ``vision_config``."""
    kind = vc.get("model_type", "clip_vision_model")
    width, heads, layers = vc["hidden_size"], vc["num_attention_heads"], vc["num_hidden_layers"]
    mlp_ratio = vc["intermediate_size"] / width
    with _fp32_default():
        if kind in ("clip_vision_model", "clip"):
            from open_clip.model import _build_vision_tower

            cfg = {
                "image_size": vc["image_size"],
                "patch_size": vc["patch_size"],
                "width": width,
                "layers": layers,
                "head_width": width // heads,
                "mlp_ratio": mlp_ratio,
            }
            quick = vc.get("hidden_act", "quick_gelu") == "quick_gelu"
            tower = _build_vision_tower(vc.get("projection_dim", width), cfg, quick_gelu=quick)
            tower.output_tokens = True
            return tower, "open_clip_vit"
        if kind == "vit":
            from timm.models.vision_transformer import VisionTransformer

            tower = VisionTransformer(
                img_size=vc["image_size"],
                patch_size=vc["patch_size"],
                embed_dim=width,
                depth=layers,
                num_heads=heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=vc.get("qkv_bias", True),
                num_classes=0,
                norm_layer=partial(nn.LayerNorm, eps=vc.get("layer_norm_eps", 1e-12)),
            )
            return tower, "timm"
    raise UserError(f"vision tower {kind!r}: medtune imports clip_vision_model and vit towers")


def _parts(folder: Path, load_weights: bool) -> tuple[VisionEncoder, MLPConnector, dict]:
    """The tower and projector of a LLaVA folder (loaded when asked), and its text config."""
    cfg = read_llava_config(folder)
    vc, tc = cfg["vision_config"], cfg["text_config"]
    tower, kind = _tower(vc)
    grid = vc["image_size"] // vc["patch_size"]
    enc = VisionEncoder(
        tower,
        kind=kind,
        output="patch",
        num_tokens=grid * grid,
        out_dim=vc["hidden_size"],
        transform=_transform(folder, vc["image_size"]),
        feature_layer=cfg.get("vision_feature_layer", -2),
    )
    text_width = tc["hidden_size"]
    conn = MLPConnector(vc["hidden_size"], text_width, hidden_dim=text_width)
    if cfg.get("projector_hidden_act", "gelu") == "linear":
        conn.act = nn.Identity()
    elif cfg.get("projector_hidden_act", "gelu") != "gelu":
        raise UserError(
            f"{folder}: projector_hidden_act {cfg['projector_hidden_act']!r} unsupported"
        )
    if load_weights:
        tower_state, proj_state = _tensors(folder, enc)
        # every tower tensor but open_clip's pooled ``proj`` (checked by the key map)
        tower.load_state_dict(tower_state, strict=False)
        conn.load_state_dict(proj_state)
    return enc, conn, tc


def _tensors(folder: Path, enc: VisionEncoder) -> tuple[dict, dict]:
    """A LLaVA folder's tower tensors (in the names of ``enc``'s tower module, every one the map
    expects) and projector tensors (an ``mlp`` connector's names)."""
    hf = read_llava_weights(folder, keep=lambda k: k.startswith((VISION, PROJ)))
    source = f"{folder} (LLaVA)"
    return vision_from_hf(hf, enc, source=source), projector_from_hf(hf, source=source)


def _assemble(decoder, family: str, enc, conn, tc: dict) -> MedVLM:
    from medtune.models.llm import placeholder_id

    return MedVLM(
        decoder,
        {"image": enc},
        {"image": conn},
        image_token_id=placeholder_id(family, tc.get("vocab_size")),
    )


def llava_medvlm(path: str, load_weights: bool = True, max_seq_len: int | None = None) -> MedVLM:
    """A MedVLM shaped (and, for tower and projector, loaded) from a transformers LLaVA folder.

    Args:
        path: the LLaVA folder.
        load_weights: read the tower and projector weights (False: random, e.g. on ``meta``).
        max_seq_len: the decoder's context (default: the text config's).

    Returns:
        A MedVLM; its decoder is empty until the recipe's checkpointer
        (:class:`LlavaLLMCheckpointer`) loads it.
    """
    from medtune.models.llm import decoder_from_hf_config

    enc, conn, tc = _parts(Path(path), load_weights)
    with tempfile.TemporaryDirectory() as tmp:  # the family builders read an HF config.json
        (Path(tmp) / "config.json").write_text(json.dumps(tc))
        decoder, family = decoder_from_hf_config(Path(tmp) / "config.json", max_seq_len)
    return _assemble(decoder, family, enc, conn, tc)


@_takes_lora_args()
def llava_medvlm_lora(
    path: str, load_weights: bool = True, max_seq_len: int | None = None, *, lora: dict
) -> MedVLM:
    """:func:`llava_medvlm` with a LoRA / DoRA / QLoRA decoder (torchtune's family LoRA builders),
    for ``lora_finetune``; the LoRA arguments are those of :func:`medtune.models.lora.lora_args`."""
    from torchtune.models.llama2 import lora_llama2
    from torchtune.models.mistral import lora_mistral
    from torchtune.models.qwen2 import lora_qwen2

    from medtune.models.llm import decoder_kwargs, family_of_hf_config
    from medtune.models.lora import lora_llama3_from_hf_config

    enc, conn, tc = _parts(Path(path), load_weights)
    family = family_of_hf_config(tc, Path(path) / "config.json")
    if family == "llama3":
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "config.json").write_text(json.dumps(tc))
            decoder = lora_llama3_from_hf_config(
                Path(tmp) / "config.json", **lora, max_seq_len=max_seq_len
            )
        return _assemble(decoder, family, enc, conn, tc)
    kw = decoder_kwargs(tc, Path(path) / "config.json", max_seq_len)
    builder = {"llama2": lora_llama2, "mistral": lora_mistral, "qwen2_5": lora_qwen2}[family]
    if family == "llama2":  # torchtune's lora_llama2 fixes RoPE's base at 10,000
        kw.pop("rope_base")
    return _assemble(_decoder(builder, **kw, **lora), family, enc, conn, tc)


class LlavaLLMCheckpointer:
    """The LLM weights of a LLaVA folder in torchtune names (torchtune's checkpointer protocol:
    ``load_checkpoint()["model"]``), for the recipes' ``checkpointer`` component."""

    def __init__(self, checkpoint_dir: str, output_dir: str | None = None, **_unused):
        self.checkpoint_dir = Path(checkpoint_dir)
        self.output_dir = output_dir

    def load_checkpoint(self) -> dict[str, dict[str, torch.Tensor]]:
        cfg = read_llava_config(self.checkpoint_dir)
        tc = cfg["text_config"]
        hf = read_llava_weights(
            self.checkpoint_dir, keep=lambda k: not k.startswith((VISION, PROJ))
        )
        return {"model": llm_from_hf(hf, head_layout(tc), tied=bool(tc.get("tie_word_embeddings")))}


def read_hf_llava(model: MedVLM, path: str, encoder: str = "image") -> dict[str, torch.Tensor]:
    """``init_from: {kind: hf_llava, path: DIR}``: a LLaVA folder's tower and projector in
    ``model``'s names (``encoders.<encoder>.tower...``, ``connectors.<encoder>.fc1/fc2``), for any
    MedVLM of that shape (e.g. :func:`llava_medvlm` with ``load_weights: false``, or an open_clip
    builder of the same ViT); the LLM comes from the checkpointer.

    Raises:
        KeyMapError: names the keys that do not fit.
    """
    folder = Path(path)
    read_llava_config(folder)
    enc, conn = model.encoders[encoder], model.connectors[encoder]
    if type(conn).__name__ != "MLPConnector":
        raise UserError(
            f"{folder}: the model's connector {type(conn).__name__} cannot hold LLaVA's MLP projector"
        )
    tower_state, proj_state = _tensors(folder, enc)
    prefix = f"encoders.{encoder}.tower." + ("trunk." if enc.kind == "open_clip_timm" else "")
    out = {prefix + k: v for k, v in tower_state.items()}
    out.update({f"connectors.{encoder}.{k}": v for k, v in proj_state.items()})
    return out
