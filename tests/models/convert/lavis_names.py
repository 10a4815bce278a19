"""State dicts with LAVIS's / MiniGPT-4's parameter names and shapes, written from their code
(``lavis/models/blip2_models/Qformer.py`` ``BertModel`` / ``BertLMHeadModel``, ``blip2_qformer.py``,
``eva_vit.py``), not from medtune's maps: the tests feed these to the converters."""

from __future__ import annotations

import torch


def lavis_qformer(
    *,
    layers: int,
    hidden: int,
    inter: int,
    vision_width: int,
    vocab: int,
    max_pos: int,
    queries: int,
    cross_freq: int = 2,
    text: bool = True,
    device: str = "cpu",
) -> dict[str, torch.Tensor]:
    """``Qformer.*`` + ``query_tokens`` + ``ln_vision`` as LAVIS names them; ``text=False`` leaves
    out what MiniGPT-4 sets to None (``cls``, word / position embeddings, text FFN blocks)."""
    g = torch.Generator().manual_seed(0)
    shapes: dict[str, tuple[int, ...]] = {}
    b = "Qformer.bert."
    if text:
        shapes[b + "embeddings.word_embeddings.weight"] = (vocab, hidden)
        shapes[b + "embeddings.position_embeddings.weight"] = (max_pos, hidden)
    shapes[b + "embeddings.LayerNorm.weight"] = (hidden,)
    shapes[b + "embeddings.LayerNorm.bias"] = (hidden,)

    def lin(name, out, inp):
        shapes[name + ".weight"] = (out, inp)
        shapes[name + ".bias"] = (out,)

    def ln(name):
        shapes[name + ".weight"] = (hidden,)
        shapes[name + ".bias"] = (hidden,)

    for i in range(layers):
        p = f"{b}encoder.layer.{i}."
        for m in ("query", "key", "value"):
            lin(p + "attention.self." + m, hidden, hidden)
        lin(p + "attention.output.dense", hidden, hidden)
        ln(p + "attention.output.LayerNorm")
        if i % cross_freq == 0:
            lin(p + "crossattention.self.query", hidden, hidden)
            lin(p + "crossattention.self.key", hidden, vision_width)
            lin(p + "crossattention.self.value", hidden, vision_width)
            lin(p + "crossattention.output.dense", hidden, hidden)
            ln(p + "crossattention.output.LayerNorm")
        if text:
            lin(p + "intermediate.dense", inter, hidden)
            lin(p + "output.dense", hidden, inter)
            ln(p + "output.LayerNorm")
        lin(p + "intermediate_query.dense", inter, hidden)
        lin(p + "output_query.dense", hidden, inter)
        ln(p + "output_query.LayerNorm")
    if text:
        lin("Qformer.cls.predictions.transform.dense", hidden, hidden)
        ln("Qformer.cls.predictions.transform.LayerNorm")
        shapes["Qformer.cls.predictions.bias"] = (vocab,)
        lin("Qformer.cls.predictions.decoder", vocab, hidden)
    shapes["query_tokens"] = (1, queries, hidden)
    shapes["ln_vision.weight"] = (vision_width,)
    shapes["ln_vision.bias"] = (vision_width,)
    out = {}
    for k, s in shapes.items():
        if device == "meta":
            out[k] = torch.empty(s, device="meta")
        else:
            out[k] = torch.randn(s, generator=g)
    out[b + "embeddings.position_ids"] = torch.arange(max_pos, device=device)[None]
    return out


def lavis_stage1_heads(hidden: int, embed: int, device: str = "cpu") -> dict[str, torch.Tensor]:
    """``vision_proj``, ``text_proj``, ``itm_head``, ``temp`` of ``Blip2Qformer``."""
    mk = (lambda *s: torch.empty(s, device="meta")) if device == "meta" else torch.randn
    return {
        "vision_proj.weight": mk(embed, hidden),
        "vision_proj.bias": mk(embed),
        "text_proj.weight": mk(embed, hidden),
        "text_proj.bias": mk(embed),
        "itm_head.weight": mk(2, hidden),
        "itm_head.bias": mk(2),
        "temp": torch.tensor(0.07, device=device),
    }


def eva_vit(*, depth: int, dim: int, patch: int, image: int, mlp_ratio: float = 4.3637):
    """``visual_encoder.*`` as LAVIS ``eva_vit.VisionTransformer`` names it (qkv without bias,
    separate ``q_bias`` / ``v_bias``; no final norm, no head)."""
    n = (image // patch) ** 2 + 1
    hid = int(dim * mlp_ratio)
    p = "visual_encoder."
    out = {
        p + "cls_token": torch.randn(1, 1, dim),
        p + "pos_embed": torch.randn(1, n, dim),
        p + "patch_embed.proj.weight": torch.randn(dim, 3, patch, patch),
        p + "patch_embed.proj.bias": torch.randn(dim),
    }
    for i in range(depth):
        q = f"{p}blocks.{i}."
        out |= {
            q + "norm1.weight": torch.randn(dim),
            q + "norm1.bias": torch.randn(dim),
            q + "attn.q_bias": torch.randn(dim),
            q + "attn.v_bias": torch.randn(dim),
            q + "attn.qkv.weight": torch.randn(3 * dim, dim),
            q + "attn.proj.weight": torch.randn(dim, dim),
            q + "attn.proj.bias": torch.randn(dim),
            q + "norm2.weight": torch.randn(dim),
            q + "norm2.bias": torch.randn(dim),
            q + "mlp.fc1.weight": torch.randn(hid, dim),
            q + "mlp.fc1.bias": torch.randn(hid),
            q + "mlp.fc2.weight": torch.randn(dim, hid),
            q + "mlp.fc2.bias": torch.randn(dim),
        }
    return out
