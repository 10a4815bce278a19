"""transformers LLaVA <-> medtune MedVLM: the only place that knows LLaVA's parameter names.

A MedVLM with one ViT tower taking patch tokens of an inner block (``feature_layer``), a per-patch
connector (``linear`` or ``mlp``) and a Llama-family decoder is exactly a transformers
``LlavaForConditionalGeneration``:

==========================  =====================================================================
medtune                     transformers (in-memory names, transformers 5)
==========================  =====================================================================
open_clip ViT tower         ``model.vision_tower.*`` of a ``clip_vision_model`` (ln_pre ->
                            ``pre_layrnorm``; fused ``in_proj`` split into q/k/v)
timm / BiomedCLIP ViT       ``model.vision_tower.*`` of a ``vit`` model (fused ``qkv`` split;
                            its pooler is unused by LLaVA and written as zeros)
``feature_layer``           ``vision_feature_layer`` (same indexing), strategy ``default`` (CLS
                            dropped, as medtune's patch output)
``mlp`` connector           ``multi_modal_projector.linear_1 / act (gelu) / linear_2``
``linear`` connector        ``linear_1`` = the projection, act ``linear``, ``linear_2`` = identity
decoder (torchtune)         ``model.language_model.*`` + ``lm_head`` (torchtune's
                            ``convert_weights.tune_to_hf`` / ``hf_to_tune``, rotary permutation)
placeholder id              ``image_token_index``
==========================  =====================================================================

What cannot be exact is refused by name (:class:`ExportError`): a tower read after its final
LayerNorm (LLaVA selects a hidden state, which never carries it), several encoders, pooled or
query-based connectors (Q-Former, resampler, pooled_unfold), towers other than plain ViTs.
"""

from __future__ import annotations

import torch

from medtune.models.convert import KeyMapError, apply_key_map
from medtune.utils.errors import UserError

VISION = "model.vision_tower."
PROJ = "model.multi_modal_projector."
LM = "model.language_model."


class ExportError(UserError, ValueError):
    """The model cannot be written as a transformers LLaVA model exactly (says why)."""


def _only_encoder(model):
    if len(model.encoders) != 1 or len(model.connectors) != 1:
        raise ExportError(
            f"a LLaVA model has one vision tower and one projector; this MedVLM has encoders "
            f"{sorted(model.encoders)} and connectors {sorted(model.connectors)}"
        )
    (name, enc), (_, conn) = (
        next(iter(model.encoders.items())),
        next(iter(model.connectors.items())),
    )
    return name, enc, conn


def check_exportable(model) -> None:
    """Raise :class:`ExportError` naming what keeps ``model`` from an exact LLaVA export."""
    _, enc, conn = _only_encoder(model)
    kind = type(conn).__name__
    if kind not in ("LinearConnector", "MLPConnector"):
        raise ExportError(
            f"connector {kind}: LLaVA's projector is per patch (linear or 2-layer MLP); a "
            "Q-Former, resampler or pooled connector has no transformers LLaVA equivalent "
            "(serve it with medtune serve, or write a custom transformers model)"
        )
    if kind == "MLPConnector" and type(conn.act).__name__ != "GELU":
        raise ExportError(f"MLP connector activation {conn.act}: LLaVA's projector uses gelu")
    if getattr(enc, "output", None) != "patch" or enc.kind not in (
        "open_clip_vit",
        "open_clip_timm",
        "timm",
    ):
        raise ExportError(
            f"encoder kind {getattr(enc, 'kind', type(enc).__name__)!r} with output "
            f"{getattr(enc, 'output', None)!r}: LLaVA needs a ViT's patch tokens"
        )
    if enc.feature_layer is None:
        raise ExportError(
            "the encoder reads tokens after its final LayerNorm, which LLaVA's "
            "vision_feature_layer cannot select; train with the encoder's feature_layer set "
            "(-1 or LLaVA-1.5's -2) to export exactly"
        )
    if enc.kind != "open_clip_vit":
        trunk = enc.tower.trunk if enc.kind == "open_clip_timm" else enc.tower
        if type(trunk).__name__ != "VisionTransformer" or trunk.num_prefix_tokens != 1:
            raise ExportError(
                f"timm tower {type(trunk).__name__} with {getattr(trunk, 'num_prefix_tokens', '?')} "
                "prefix tokens: only a plain ViT with one CLS token maps to transformers' ViT"
            )
        if not isinstance(trunk.norm_pre, torch.nn.Identity) or any(
            not isinstance(getattr(b, n), torch.nn.Identity)
            for b in trunk.blocks
            for n in ("ls1", "ls2")
        ):
            raise ExportError(
                "timm ViT with a pre-norm or layer scale: transformers' ViT has neither"
            )


# ---------------------------------------------------------------- vision towers


def _ocv_names(n_layers: int) -> list[tuple[str, str]]:
    """(open_clip name, CLIP vision name) pairs, fused attention handled separately."""
    pairs = [
        ("class_embedding", "embeddings.class_embedding"),
        ("conv1.weight", "embeddings.patch_embedding.weight"),
        ("positional_embedding", "embeddings.position_embedding.weight"),
        ("ln_pre.weight", "pre_layrnorm.weight"),
        ("ln_pre.bias", "pre_layrnorm.bias"),
        ("ln_post.weight", "post_layernorm.weight"),
        ("ln_post.bias", "post_layernorm.bias"),
    ]
    for i in range(n_layers):
        a, b = f"transformer.resblocks.{i}.", f"encoder.layers.{i}."
        for x, y in (
            ("ln_1", "layer_norm1"),
            ("ln_2", "layer_norm2"),
            ("attn.out_proj", "self_attn.out_proj"),
            ("mlp.c_fc", "mlp.fc1"),
            ("mlp.c_proj", "mlp.fc2"),
        ):
            pairs += [(f"{a}{x}.weight", f"{b}{y}.weight"), (f"{a}{x}.bias", f"{b}{y}.bias")]
    return pairs


def _timm_names(n_layers: int) -> list[tuple[str, str]]:
    pairs = [
        ("cls_token", "embeddings.cls_token"),
        ("pos_embed", "embeddings.position_embeddings"),
        ("patch_embed.proj.weight", "embeddings.patch_embeddings.projection.weight"),
        ("patch_embed.proj.bias", "embeddings.patch_embeddings.projection.bias"),
        ("norm.weight", "layernorm.weight"),
        ("norm.bias", "layernorm.bias"),
    ]
    for i in range(n_layers):
        a, b = f"blocks.{i}.", f"layers.{i}."
        for x, y in (
            ("norm1", "layernorm_before"),
            ("norm2", "layernorm_after"),
            ("attn.proj", "attention.o_proj"),
            ("mlp.fc1", "mlp.fc1"),
            ("mlp.fc2", "mlp.fc2"),
        ):
            pairs += [(f"{a}{x}.weight", f"{b}{y}.weight"), (f"{a}{x}.bias", f"{b}{y}.bias")]
    return pairs


def _fused(kind: str, n_layers: int) -> list[tuple[str, str]]:
    """(medtune fused qkv prefix, HF attention prefix) per layer."""
    if kind == "open_clip_vit":
        return [
            (f"transformer.resblocks.{i}.attn.in_proj_", f"encoder.layers.{i}.self_attn.")
            for i in range(n_layers)
        ]
    return [(f"blocks.{i}.attn.qkv.", f"layers.{i}.attention.") for i in range(n_layers)]


def _tower(enc):
    """(module whose state names the maps use, its kind, number of blocks)."""
    if enc.kind == "open_clip_vit":
        return enc.tower, enc.kind, len(enc.tower.transformer.resblocks)
    trunk = enc.tower.trunk if enc.kind == "open_clip_timm" else enc.tower
    return trunk, "timm", len(trunk.blocks)


def vision_to_hf(enc) -> dict[str, torch.Tensor]:
    """The encoder's tower weights under LLaVA's ``model.vision_tower.`` names."""
    module, kind, n = _tower(enc)
    sd = module.state_dict()
    names = _ocv_names(n) if kind == "open_clip_vit" else _timm_names(n)
    out = {VISION + hf: sd[ours] for ours, hf in names}
    for ours, hf in _fused(kind, n):  # q, k, v stacked in that order in both towers
        w, b = sd[ours + "weight"], sd[ours + "bias"]
        for part, wi, bi in zip(
            ("q_proj", "k_proj", "v_proj"), w.chunk(3), b.chunk(3), strict=True
        ):
            out[f"{VISION}{hf}{part}.weight"] = wi
            out[f"{VISION}{hf}{part}.bias"] = bi
    if kind == "timm":  # transformers' ViTModel keeps a pooler LLaVA never calls
        d = sd["norm.weight"].shape[0]
        out[VISION + "pooler.dense.weight"] = torch.zeros(d, d)
        out[VISION + "pooler.dense.bias"] = torch.zeros(d)
    return out


def vision_from_hf(hf: dict[str, torch.Tensor], enc, *, source: str) -> dict[str, torch.Tensor]:
    """LLaVA vision weights -> the encoder tower's state dict (refusing leftovers by name)."""
    module, kind, n = _tower(enc)
    names = dict(
        (hf_, ours) for ours, hf_ in (_ocv_names(n) if kind == "open_clip_vit" else _timm_names(n))
    )
    # open_clip's pooled projection ``proj`` is no part of a LLaVA tower: it keeps its init
    expected = {
        k: v.shape
        for k, v in module.state_dict().items()
        if not (kind == "open_clip_vit" and k == "proj")
    }
    fused = {}
    for ours, hfp in _fused(kind, n):
        try:
            fused[ours + "weight"] = torch.cat(
                [hf[f"{VISION}{hfp}{p}.weight"] for p in ("q_proj", "k_proj", "v_proj")]
            )
            fused[ours + "bias"] = torch.cat(
                [hf[f"{VISION}{hfp}{p}.bias"] for p in ("q_proj", "k_proj", "v_proj")]
            )
        except KeyError as e:
            raise KeyMapError(f"{source}: missing vision attention weight {e}") from None
    rest = {
        k[len(VISION) :]: v
        for k, v in hf.items()
        if k.startswith(VISION)
        and not any(
            k.startswith(f"{VISION}{hfp}{p}.")
            for _, hfp in _fused(kind, n)
            for p in ("q_proj", "k_proj", "v_proj")
        )
    }
    state = apply_key_map(
        rest,
        names.get,
        {k: s for k, s in expected.items() if k not in fused},
        source=source,
        ignore=lambda k: k.startswith("pooler.") or k == "embeddings.position_ids",
    )
    state.update(fused)
    return state


# ---------------------------------------------------------------- projector


def projector_to_hf(conn) -> tuple[dict[str, torch.Tensor], str]:
    """Connector weights under LLaVA's projector names, and ``projector_hidden_act``."""
    if type(conn).__name__ == "MLPConnector":
        return {
            PROJ + "linear_1.weight": conn.fc1.weight,
            PROJ + "linear_1.bias": conn.fc1.bias,
            PROJ + "linear_2.weight": conn.fc2.weight,
            PROJ + "linear_2.bias": conn.fc2.bias,
        }, "gelu"
    d = conn.proj.weight.shape[0]
    # identity second layer: exact in fp32 (x @ I == x), so a linear connector exports losslessly
    return {
        PROJ + "linear_1.weight": conn.proj.weight,
        PROJ + "linear_1.bias": conn.proj.bias,
        PROJ + "linear_2.weight": torch.eye(d, dtype=conn.proj.weight.dtype),
        PROJ + "linear_2.bias": torch.zeros(d, dtype=conn.proj.bias.dtype),
    }, "linear"


def projector_from_hf(hf: dict[str, torch.Tensor], *, source: str) -> dict[str, torch.Tensor]:
    """LLaVA projector -> an ``mlp`` connector's state dict."""
    names = {f"{PROJ}linear_{i}.{p}": f"fc{i}.{p}" for i in (1, 2) for p in ("weight", "bias")}
    got = {k: v for k, v in hf.items() if k.startswith(PROJ)}
    missing = sorted(set(names) - set(got))
    if missing:
        raise KeyMapError(f"{source}: missing projector weights {missing}")
    return {names[k]: v for k, v in got.items() if k in names}


# ---------------------------------------------------------------- language model


def llm_to_hf(decoder_state: dict[str, torch.Tensor], shape: dict) -> dict[str, torch.Tensor]:
    """torchtune decoder names -> LLaVA's ``model.language_model.*`` + ``lm_head.weight``."""
    from torchtune.models.convert_weights import tune_to_hf

    hf = tune_to_hf(dict(decoder_state), **shape)
    out = {}
    for k, v in hf.items():
        out["lm_head.weight" if k == "lm_head.weight" else LM + k.removeprefix("model.")] = v
    return out


def llm_from_hf(hf: dict[str, torch.Tensor], shape: dict, *, tied: bool) -> dict[str, torch.Tensor]:
    """LLaVA's language model weights -> torchtune decoder names."""
    from torchtune.models.convert_weights import hf_to_tune

    plain = {"model." + k[len(LM) :]: v for k, v in hf.items() if k.startswith(LM)}
    if "lm_head.weight" in hf and not tied:
        plain["lm_head.weight"] = hf["lm_head.weight"]
    if any(k.endswith("self_attn.q_proj.bias") for k in plain):  # Qwen2 / 2.5: q/k/v biases
        from torchtune.models.qwen2._convert_weights import qwen2_hf_to_tune

        return qwen2_hf_to_tune(plain, **shape, tie_word_embeddings=tied)
    return hf_to_tune(plain, **shape)


# ---------------------------------------------------------------- files on disk

_VIT_LEGACY = (
    (".attention.attention.query.", ".attention.q_proj."),
    (".attention.attention.key.", ".attention.k_proj."),
    (".attention.attention.value.", ".attention.v_proj."),
    (".attention.output.dense.", ".attention.o_proj."),
    (".intermediate.dense.", ".mlp.fc1."),
    (".output.dense.", ".mlp.fc2."),
)


def normalize_name(key: str) -> str:
    """A LLaVA checkpoint name as written on disk (the hub's LLaVA-1.5 layout, or what
    transformers' ``save_pretrained`` writes) -> the in-memory names used here."""
    for old, new in (
        ("language_model.model.", LM),
        ("language_model.lm_head.", "lm_head."),
        ("vision_tower.vision_model.", VISION),
        ("vision_tower.", VISION),
        ("multi_modal_projector.", PROJ),
    ):
        if key.startswith(old):
            key = new + key[len(old) :]
            break
    if key.startswith(VISION + "encoder.layer."):  # transformers 4's ViT names
        key = VISION + "layers." + key[len(VISION + "encoder.layer.") :]
        for old, new in _VIT_LEGACY:
            key = key.replace(old, new)
    return key


def read_llava_weights(folder, keep=lambda k: True) -> dict[str, torch.Tensor]:
    """Read a LLaVA folder's safetensors (one file or an index of shards), names normalized.

    Args:
        folder: the model folder.
        keep: normalized name -> whether to read it (e.g. only the vision tower and projector).
    """
    import json
    from pathlib import Path

    from safetensors import safe_open

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise UserError(
            f"{folder}: no model.safetensors or model.safetensors.index.json (expected a "
            "transformers LLaVA folder saved with safetensors)"
        )
    out = {}
    for name in files:
        with safe_open(str(folder / name), framework="pt") as f:
            for k in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                nk = normalize_name(k)
                if keep(nk):
                    out[nk] = f.get_tensor(k)
    return out
